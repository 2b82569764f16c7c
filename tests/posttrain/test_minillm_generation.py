"""Generation: KV cache == no cache == naive unbatched decoding; EOS/max-length stops; TP=2 and
PP=2 give the same tokens as TP=1 for the same seed (greedy, sampled, teacher-mixed)."""
import torch

from dist_helpers import run_workers
from megatron_kd.models import ModelConfig

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
           vocab_size=300, add_qkv_bias=True)
V = 300
EOS = 5


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(6, V, (n,), generator=g).tolist() for n in (3, 7, 5, 1, 9)]


def _build(tp=1, pp=1, states=None):
    from megatron_kd.models import build_gpt_model
    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    set_seed(0)
    models, full = [], []
    for i in range(2):
        cfg = ModelConfig(**{**CFG, "num_layers": 2 + 2 * i})
        m = build_gpt_model(cfg)
        if states is None:
            full.append(gather_full_state(m, cfg))
        else:
            load_full_state(m, states[i], cfg)
        models.append(m)
    return models, full


def _cases(student, teacher):
    from megatron_kd.posttrain.generation import GenerationConfig, generate
    from megatron_kd.posttrain.sampling import SamplingConfig

    out = {}
    cases = {"greedy": (SamplingConfig(greedy=True), 0.0), "sample": (SamplingConfig(top_p=0.9, top_k=50), 0.0),
             "mixed": (SamplingConfig(), 0.2)}
    for name, (samp, alpha) in cases.items():
        gc = GenerationConfig(max_new_tokens=10, sampling=samp, eos_id=EOS, pad_id=0, seed=7)
        o = generate(student, _prompts(), gc, V, teacher=teacher, mix_alpha=alpha)
        out[name] = o.responses()
    return out


def _worker(rank, world_size, tp, pp, states):
    models, _ = _build(tp, pp, states)
    return _cases(*models)


def test_cache_equals_recompute_and_naive_decoding():
    from megatron_kd.posttrain.generation import GenerationConfig, forward_logits, generate
    from megatron_kd.posttrain.sampling import SamplingConfig, sample_next

    (student, teacher), _ = _build()
    prompts = _prompts()
    for samp in (SamplingConfig(greedy=True), SamplingConfig(temperature=0.9, top_p=0.95)):
        variants = []
        for use_cache in (True, False):
            for compact in (True, False):
                gc = GenerationConfig(max_new_tokens=8, sampling=samp, eos_id=EOS, pad_id=0, seed=3,
                                      use_cache=use_cache, compact=compact)
                variants.append(generate(student, prompts, gc, V))
        for v in variants[1:]:
            assert v.responses() == variants[0].responses()
            assert torch.equal(v.tokens, variants[0].tokens)
        # Naive reference: one sequence at a time, full forward of the whole prefix each step.
        for i, p in enumerate(prompts):
            seq, ref = list(p), []
            for _ in range(8):
                logits = forward_logits(student, torch.tensor([seq]), V)[:, -1]
                nxt = int(sample_next(logits, samp, 3, torch.tensor([i]), len(seq))[0])
                seq.append(nxt)
                ref.append(nxt)
                if nxt == EOS:
                    break
            assert variants[0].responses()[i] == ref
    out = variants[0]
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts]
    for row, p in zip(out.tokens.tolist(), prompts):
        assert row[: len(p)] == p


def test_eos_and_length_stop():
    from megatron_kd.posttrain.generation import GenerationConfig, generate
    from megatron_kd.posttrain.sampling import SamplingConfig

    (student, _), _ = _build()
    # A model whose output is always EOS: bias the output layer.
    with torch.no_grad():
        student.output_layer.weight.zero_()
        student.output_layer.weight[EOS] = 0.0
    gc = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(greedy=True), eos_id=0, pad_id=1)
    out = generate(student, _prompts(), gc, V)
    assert out.response_lengths.tolist() == [1] * 5  # argmax of all-zero logits is id 0 = EOS
    gc = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(greedy=True), eos_id=None, pad_id=1)
    out = generate(student, _prompts(), gc, V)
    assert out.response_lengths.tolist() == [6] * 5


def test_tp2_and_pp2_generate_same_tokens_as_tp1():
    (student, teacher), states = _build()
    ref = _cases(student, teacher)
    for tp, pp in ((2, 1), (1, 2)):
        outs = run_workers(_worker, 2, tp, pp, states)
        for out in outs:
            assert out == ref, (tp, pp)
