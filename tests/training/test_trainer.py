"""Trainer on megatron-core schedules: PP=2 (1F1B) equals PP=1 with the same weights, gradient
accumulation equals one big micro-batch, and the pluggable hooks (extra report keys, on_step_end,
extra_state) reach the metrics file and the checkpoint, and a crash while saving leaves the latest
good checkpoint loadable."""
import functools
import io
from pathlib import Path

import pytest
import torch

from dist_helpers import run_workers

MODEL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
             vocab_size=200, max_position_embeddings=64)
STEPS = 4


def _trainer(tp, pp, mbs, gbs, full_state, ckpt_dir=None, forward_step=None, fused=False, **kwargs):
    from megatron_kd.models import ModelConfig
    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training import (CheckpointConfig, LoggingConfig, OptimConfig, SequentialBatchIterator,
                                      SyntheticDataset, Trainer, TrainConfig, make_lm_forward_step,
                                      setup_model_and_optimizer, unwrap_model)

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    init_distributed(parallel)
    set_seed(7)
    cfg = ModelConfig(**MODEL)
    optim = OptimConfig(lr=5e-3, min_lr=5e-4, warmup_iters=1, clip_grad=1.0, weight_decay=0.1)
    chunks, optimizer, scheduler = setup_model_and_optimizer(cfg, parallel, optim, STEPS)
    if full_state is None:
        # clone: gather_full_state may alias the live fp32 parameters, which training then changes
        full_state = {k: v.clone() for k, v in gather_full_state(unwrap_model(chunks[0]), cfg).items()}
    load_full_state(unwrap_model(chunks[0]), full_state, cfg)
    train = TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, seq_length=16, train_iters=STEPS,
                        log_interval=0, eval_iters=1, eval_interval=2)
    trainer = Trainer(chunks, optimizer, scheduler, forward_step or make_lm_forward_step(cfg.vocab_size, fused), cfg,
                      train, CheckpointConfig(save=ckpt_dir, save_interval=2 if ckpt_dir else 0),
                      LoggingConfig(quiet=True), **kwargs)
    data = SyntheticDataset(cfg.vocab_size, 16, seed=3)
    valid = SyntheticDataset(cfg.vocab_size, 16, seed=3, index_offset=10**9)
    from megatron.core import parallel_state as ps

    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    make_train = lambda consumed: SequentialBatchIterator(data, mbs, dpr, dp, consumed)  # noqa: E731
    make_valid = lambda: SequentialBatchIterator(valid, mbs, dpr, dp, 0)  # noqa: E731
    return trainer, make_train, make_valid, full_state


def _curve(tp, pp, mbs, gbs, full_state, fused=False):
    trainer, make_train, make_valid, state = _trainer(tp, pp, mbs, gbs, full_state, fused=fused)
    steps = []
    trainer.on_step_end = lambda step, m: steps.append((m["loss"], m["grad_norm"], m["lr"]))
    result = trainer.fit(make_train, make_valid)
    return steps, result["valid"]["loss"], state


def _hooked_forward_step(data_iterator, model, vocab_size):
    from megatron_kd.training import lm_forward_step

    output, lm_loss = lm_forward_step(data_iterator, model, vocab_size=vocab_size)

    def loss_func(output_tensor):
        loss_sum, num_tokens, report = lm_loss(output_tensor)
        report["kd"] = torch.stack([0.5 * report["lm"][0], report["lm"][1]])
        report["alpha"] = torch.tensor(0.25)
        return loss_sum, num_tokens, report

    return output, loss_func


def _reference_worker(rank, world_size, tmp):
    """World 1: PP=1 curve, the same with one big micro-batch, and a hooked run that resumes."""
    ref, ref_valid, state = _curve(1, 1, 2, 8, None)
    big, big_valid, _ = _curve(1, 1, 8, 8, state)

    calls, loaded = [], []
    fwd = functools.partial(_hooked_forward_step, vocab_size=MODEL["vocab_size"])
    trainer, make_train, make_valid, _ = _trainer(
        1, 1, 2, 8, state, ckpt_dir=f"{tmp}/ckpt", forward_step=fwd,
        on_step_end=calls.append, extra_state=lambda: {"kd_step": len(calls)})  # a one-argument hook
    # Stop after step 3 and crash while saving iteration 3: `latest` must still name iteration 2.
    trainer.train_cfg.exit_interval = 3
    import megatron_kd.training.checkpoint as ckpt_module

    real_save = ckpt_module.dist_checkpointing.save

    def crashing_save(sharded, path, *args, **kwargs):
        if path.endswith("iter_0000003.tmp"):
            (Path(path) / "half_written.distcp").write_bytes(b"\0" * 10)
            raise RuntimeError("simulated crash during save")
        return real_save(sharded, path, *args, **kwargs)

    ckpt_module.dist_checkpointing.save = crashing_save
    try:
        trainer.fit(make_train, make_valid)
        raise AssertionError("the simulated crash did not happen")
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    finally:
        ckpt_module.dist_checkpointing.save = real_save
    latest_after_crash = (Path(tmp) / "ckpt" / "latest").read_text().strip()
    tmp_left = (Path(tmp) / "ckpt" / "iter_0000003.tmp").is_dir()
    resumed, make_train, make_valid, _ = _trainer(
        1, 1, 2, 8, state, ckpt_dir=f"{tmp}/ckpt", forward_step=fwd, load_extra_state=loaded.append)
    assert resumed.resume()
    resumed.fit(make_train, make_valid)
    return _packed(dict(ref=ref, ref_valid=ref_valid, big=big, big_valid=big_valid, state=state, calls=calls,
                        loaded=loaded, iteration=resumed.iteration, latest_after_crash=latest_after_crash,
                        tmp_left=tmp_left, tmp_cleaned=not (Path(tmp) / "ckpt" / "iter_0000003.tmp").exists()))


def _packed(obj):
    """Tensors through the result queue as bytes: torch's fd sharing races with the worker's exit."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpacked(data):
    return torch.load(io.BytesIO(data), weights_only=False)


def _pp_worker(rank, world_size, tp, pp, state, fused=False):
    steps, valid, _ = _curve(tp, pp, 2, 8, state, fused=fused)
    return steps, valid


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    (out,) = run_workers(_reference_worker, 1, str(tmp))
    out = _unpacked(out)
    out["tmp"] = tmp
    return out


def _assert_same_curve(got, want, atol=1e-5):
    assert len(got) == len(want) == STEPS
    for (loss, gnorm, lr), (wloss, wgnorm, wlr) in zip(got, want):
        assert loss == pytest.approx(wloss, abs=atol)
        assert gnorm == pytest.approx(wgnorm, abs=atol * 10)
        assert lr == wlr


def test_gradient_accumulation_equals_one_big_microbatch(reference):
    _assert_same_curve(reference["big"], reference["ref"])
    assert reference["big_valid"] == pytest.approx(reference["ref_valid"], abs=1e-5)
    losses = [s[0] for s in reference["ref"]]
    assert losses[-1] < losses[0]


def test_pp2_1f1b_equals_pp1_same_weights(reference):
    outs = run_workers(_pp_worker, 2, 1, 2, reference["state"])
    for steps, valid in outs:  # every rank gets the metrics (broadcast from the last stage)
        _assert_same_curve(steps, reference["ref"])
        assert valid == pytest.approx(reference["ref_valid"], abs=1e-5)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_fused_lm_loss_equals_megatron_cross_entropy(reference, tp, pp):
    """train.fused_lm_loss (output layer + cross-entropy chunk by chunk, pretrain's default) trains the
    same curve as megatron's full-logits cross-entropy at TP=1 (the reference), TP=2 and PP=2."""
    outs = run_workers(_pp_worker, tp * pp, tp, pp, reference["state"], True)
    for steps, valid in outs:
        _assert_same_curve(steps, reference["ref"])
        assert valid == pytest.approx(reference["ref_valid"], abs=1e-5)


def _megatron_logits_forward_step(data_iterator, model, vocab_size):
    """The LM step before the seq-first head: the model's own [b, s, V] (transposed, copied) logits."""
    from megatron_kd.training.lm_loss import batch_to_device, lm_loss_func

    batch = batch_to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, functools.partial(lm_loss_func, batch["loss_mask"], labels=batch["labels"], vocab_size=vocab_size)


def _bits_worker(rank, world_size, tp, state):
    from megatron_kd.models.sharding import gather_full_state
    from megatron_kd.training import unwrap_model

    out = {}
    for name, step in (("megatron", functools.partial(_megatron_logits_forward_step, vocab_size=MODEL["vocab_size"])),
                       ("seq_first", None)):
        trainer, make_train, make_valid, _ = _trainer(tp, 1, 2, 8, state, forward_step=step)
        steps = []
        trainer.on_step_end = lambda i, m: steps.append((m["loss"], m["grad_norm"]))
        valid = trainer.fit(make_train, make_valid)["valid"]["loss"]
        weights = gather_full_state(unwrap_model(trainer.model_chunks[0]), trainer.model_config)
        out[name] = (steps, valid, {k: v.clone() for k, v in weights.items()})
    return _packed(out)


@pytest.mark.parametrize("tp", [1, 2])
def test_lm_step_without_logits_copy_trains_bit_identically(reference, tp):
    """The default LM step reads the output layer's [s, b, V] logits in place (no [b, s] copy of them,
    none of their gradient): the same losses, gradient norms and weights, bit for bit."""
    for data in run_workers(_bits_worker, tp, tp, reference["state"]):
        got = _unpacked(data)
        assert got["seq_first"][0] == got["megatron"][0]
        assert got["seq_first"][1] == got["megatron"][1]
        a, b = got["seq_first"][2], got["megatron"][2]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_tp2_pp2_equals_tp1_pp1(reference):
    outs = run_workers(_pp_worker, 4, 2, 2, reference["state"], timeout=900)
    for steps, valid in outs:
        _assert_same_curve(steps, reference["ref"])


def test_hooks_and_crash_during_save(reference):
    from megatron_kd.utils.progress import read_jsonl

    assert reference["calls"] == [1, 2, 3]  # exit_interval=3 stopped the first run after step 3...
    assert reference["latest_after_crash"] == "iter_0000002"  # ...whose save crashed: latest intact
    assert not reference["tmp_left"] and reference["tmp_cleaned"]  # a failed save removes its half-written dir
    assert reference["loaded"] == [{"kd_step": 2}]
    assert reference["iteration"] == STEPS
    records = read_jsonl(reference["tmp"] / "ckpt" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert r["kd"] == pytest.approx(0.5 * r["lm"], rel=1e-6) and r["alpha"] == pytest.approx(0.25)
        assert {"lr", "grad_norm", "tokens_per_s", "consumed_samples"} <= set(r)
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4] and all("kd" in r and "ppl" in r for r in valid)
    # the hooked run trains the same model on the same data as the reference: same LM loss curve
    assert [r["lm"] for r in train] == pytest.approx([s[0] for s in reference["ref"]], abs=1e-5)
