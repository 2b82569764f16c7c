"""Post-training of instruction-following students on the shared Trainer (``training.loop``).

Each algorithm is a batch source + a :class:`megatron_kd.training.loop.TrainStep`:
``sft`` (SFT and word-level KD: instruction batches with response masks), ``minillm`` (MiniLLM:
rollout rounds + a multi-epoch PPO step), ``onpolicy`` (GKD / DistiLLM: student / teacher / gold /
replayed responses + their divergences). Shared pieces: ``sampling`` (vocab-parallel sampling),
``generation`` (KV-cached batched decoding under TP/PP), ``losses`` (MiniLLM's terms), ``rollout``
(teacher-mixed experience, advantages), ``evaluate`` (ROUGE-L, exact reverse KL), ``data``
(instruction datasets), ``chat`` (multi-turn ``messages`` JSONL), ``seqkd`` (SeqKD data),
``config`` (the shared config names and their old aliases), ``steps`` (micro-batch passes),
``run`` (command drivers). See docs/posttrain.md.
"""
