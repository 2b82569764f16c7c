"""GPU: online KD with a bf16 student (Float16Module) and a bf16 teacher, and the CUDA-event timings."""
import pytest

from dist_helpers import run_workers


def _gpu_worker(rank, world_size, tmp):
    import torch

    from distkit import distill_config, make_teacher_checkpoint
    from megatron_kd.distill.run import run_distill
    from megatron_kd.runtime import destroy_distributed

    make_teacher_checkpoint(f"{tmp}/teacher")
    destroy_distributed()
    cfg = distill_config(f"{tmp}/teacher", steps=4, overrides=["optim.precision=bf16", "teacher.dtype=bf16"])
    result = run_distill(cfg)
    return {k: float(v) for k, v in result["train"].items()}, torch.cuda.max_memory_allocated()


@pytest.mark.gpu
def test_bf16_online_kd_on_gpu(tmp_path):
    (out,) = run_workers(_gpu_worker, 1, str(tmp_path))
    train, _ = out
    assert train["kd"] > 0 and train["lm"] > 0 and train["total"] == pytest.approx(0.4 * train["lm"] + 0.6 * train["kd"],
                                                                                  rel=1e-3)
    assert 0 < train["teacher_time_frac"] < 1 and train["teacher_time_s"] > 0
