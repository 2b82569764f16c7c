"""MiniLLM (reverse-KL policy-gradient KD) and its neighbours for instruction-tuned students.

Modules: ``sampling`` (vocab-parallel sampling), ``generation`` (KV-cached batched decoding under
TP/PP), ``losses`` (MiniLLM's terms), ``rollout`` (teacher-mixed experience, advantages),
``trainer`` (the PPO-style loop), ``baselines`` (SFT, word-level KD, SeqKD data),
``onpolicy`` (GKD, DistiLLM), ``evaluate`` (ROUGE-L, exact reverse KL), ``data`` (instruction
datasets), ``run`` (command drivers). See docs/minillm.md.
"""
