"""A local Hugging Face model directory used wherever a checkpoint is, with no conversion step:
loaded directly it gives the same logits as its ``convert hf-to-mcore`` checkpoint (dense and MoE,
TP=1 and TP=2); as an online teacher the same KD losses; a student starts from it with
``checkpoint.load=HF checkpoint.finetune=true`` and no ``model.*`` fields.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/interop/test_hf_source.py``
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from dist_helpers import run_workers
from moe_hf import make_hf_moe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "distill"))

SEQ = 16
TEACHER_HF = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=200, max_position_embeddings=64)


def _make_dense(root: Path) -> Path:
    import transformers

    cfg = transformers.Qwen2Config(**TEACHER_HF, tie_word_embeddings=False)
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.3) + (1.0 if "norm" in name else 0.0))
    path = root / "qwen2"
    model.save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_kd.interop.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("hfsrc")
    out = {"qwen2": _make_dense(root), "qwen3_moe": make_hf_moe("qwen3_moe", root)}
    for name in list(out):
        hf_to_mcore(out[name], root / f"{name}_mcore", show_progress=False)
        out[f"{name}_mcore"] = root / f"{name}_mcore"
    return out


def _logits_worker(rank, world_size, paths, tp):
    from megatron_kd.interop import is_hf_model_dir
    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.checkpoint import load_model_for_inference, read_checkpoint_meta
    from megatron_kd.models.sharding import gather_full_state

    init_distributed(ParallelConfig(tensor_parallel=tp))
    tokens = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(SEQ).expand(2, SEQ)
    out = {}
    for path in paths:
        meta = read_checkpoint_meta(path)
        assert is_hf_model_dir(path) == (meta.get("source") == "huggingface")
        model, cfg, _ = load_model_for_inference(path)
        with torch.no_grad():
            logits = model(tokens, pos, None)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        out[path] = gather_from_tensor_model_parallel_region(logits)[..., :cfg.vocab_size].clone()
        if tp == 1:
            out[path + ":state"] = {k: v.clone() for k, v in gather_full_state(model, cfg).items()}
    return out if rank == 0 else None


@pytest.mark.parametrize("name", ["qwen2", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_hf_dir_loads_like_its_converted_checkpoint(models, name):
    hf, mc = str(models[name]), str(models[name + "_mcore"])
    (out,) = run_workers(_logits_worker, 1, [hf, mc], 1)
    assert torch.equal(out[hf], out[mc])
    for k, v in out[mc + ":state"].items():
        assert torch.equal(out[hf + ":state"][k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3_moe"])
def test_hf_dir_loads_at_tp2(models, name):
    hf, mc = str(models[name]), str(models[name + "_mcore"])
    (ref,) = run_workers(_logits_worker, 1, [mc], 1)
    tp2 = run_workers(_logits_worker, 2, [hf], 2)[0]
    torch.testing.assert_close(tp2[hf], ref[mc], atol=1e-4, rtol=1e-4)


def _kd_worker(rank, world_size, teachers, tmp):
    from distkit import build, distill_config, fit

    from megatron_kd.runtime import destroy_distributed

    losses, state = {}, None
    for name, teacher in teachers.items():
        cfg = distill_config(teacher, steps=2, overrides=["model.vocab_size=200"])
        trainer, make_train, make_valid, state = build(cfg, state)
        steps, valid = fit(trainer, make_train, make_valid)
        losses[name] = ([{k: s[k] for k in ("loss", "kd", "lm") if k in s} for s in steps],
                        {k: valid[k] for k in ("kd", "lm") if k in valid})
        destroy_distributed()
    return losses


def test_hf_dir_as_online_teacher_same_kd_loss(models, tmp_path):
    (out,) = run_workers(_kd_worker, 1, {"hf": str(models["qwen2"]), "mcore": str(models["qwen2_mcore"])},
                         str(tmp_path))
    hf_steps, hf_valid = out["hf"]
    mc_steps, mc_valid = out["mcore"]
    assert hf_steps and "kd" in hf_steps[0] and hf_steps == mc_steps and hf_valid == mc_valid


def _finetune_worker(rank, world_size, hf, tmp):
    import megatron_kd.interop.source  # noqa: F401 - registers HF dirs (the CLI does this for pretrain)
    from megatron_kd.config import load_config
    from megatron_kd.training import PretrainConfig
    from megatron_kd.training.checkpoint import read_model_config
    from megatron_kd.training.pretrain import run_pretrain

    items = ["data.synthetic=true", "train.micro_batch_size=2", "train.global_batch_size=2", f"train.seq_length={SEQ}",
             "train.train_iters=1", "train.eval_iters=0", "train.log_interval=0", "optim.warmup_iters=0",
             "logging.quiet=true", f"checkpoint.load={hf}", "checkpoint.finetune=true", f"checkpoint.save={tmp}/ft"]
    run_pretrain(load_config(PretrainConfig, None, items))
    return read_model_config(f"{tmp}/ft").to_dict()


def test_student_starts_from_hf_dir_without_model_fields(models, tmp_path):
    from megatron_kd.interop.source import hf_meta

    (cfg,) = run_workers(_finetune_worker, 1, str(models["qwen2"]), str(tmp_path))
    assert cfg == hf_meta(models["qwen2"])["model_config"]


def _eval_logits_worker(rank, world_size, hf, mc, tmp):
    import numpy as np

    import megatron_kd.interop  # noqa: F401 - registers HF dirs
    from megatron_kd.evaluation.lm_loss import evaluate_checkpoint_lm_loss
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits
    from megatron_kd.logits.store import LogitsStore
    from megatron_kd.miniplm.dataset_io import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    prefix = f"{tmp}/docs"
    with IndexedDatasetWriter(prefix, np.int32, {"tokenizer": None}) as w:
        for _ in range(4):
            w.add(rng.integers(0, 200, 20), {})
    res = {name: evaluate_checkpoint_lm_loss(path, prefix, seq_length=SEQ)["loss"] for name, path in
           (("hf", hf), ("mcore", mc))}
    precompute_logits(PrecomputeConfig(teacher=hf, data=prefix, out=f"{tmp}/store", seq_length=SEQ, top_k=8,
                                       dtype="fp32"))
    res["store_complete"] = bool(LogitsStore(f"{tmp}/store").manifest.get("complete"))
    return res


def test_hf_dir_for_eval_and_logits(models, tmp_path):
    (res,) = run_workers(_eval_logits_worker, 1, str(models["qwen2"]), str(models["qwen2_mcore"]), str(tmp_path))
    assert res["hf"] == res["mcore"] and res["store_complete"]
