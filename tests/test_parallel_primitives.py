"""megatron_kd.runtime.parallel: groups, reducers and unwrap, on one process and on TP=2 / DP=2 (gloo)."""
from __future__ import annotations

import torch

from megatron_kd.runtime.parallel import SINGLE, all_reduce_, dp_group, dp_mean, dp_sum, tp_group, unwrap
from tests.dist_helpers import run_workers


def test_single_process_defaults():
    assert tp_group() == SINGLE and dp_group() == SINGLE
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t, tp_group(), "max") is t and dp_sum(t) is t and dp_mean(t).tolist() == [1.0, 2.0]
    inner = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap(Wrap(Wrap(inner))) is inner and unwrap(inner) is inner
    assert SINGLE.shard_offset(7) == 0 and SINGLE.vocab_offset(7) == 0


def _worker(rank, world_size):
    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.runtime.parallel import dp_all_gather_object

    t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)], dtype=torch.float64)
    init_distributed(ParallelConfig(tensor_parallel=2))  # TP=2, DP=1
    tp, dp = tp_group(), dp_group()
    out = {"tp": (tp.rank, tp.world_size), "dp_tp2": dp.world_size, "off": tp.shard_offset(5),
           "tmax": all_reduce_(t.clone(), tp, "max").tolist(), "tsum": all_reduce_(t.clone(), tp).tolist(),
           "tmin": all_reduce_(t.clone(), tp, "min").tolist()}
    init_distributed(ParallelConfig(tensor_parallel=1))  # re-initialised: TP=1, DP=2
    dp = dp_group()
    out.update(dp=(dp.rank, dp.world_size), tp_dp2=tp_group().world_size, dsum=dp_sum(t.clone()).tolist(),
               dmean=dp_mean(t.clone()).tolist(), gather=dp_all_gather_object(rank))
    return out


def test_tp2_then_dp2_groups_and_reducers():
    out = run_workers(_worker, 2)
    for r, o in enumerate(out):
        assert o["tp"] == (r, 2) and o["dp_tp2"] == 1 and o["off"] == 5 * r
        assert o["tmax"] == [2.0, 20.0] and o["tsum"] == [3.0, 30.0] and o["tmin"] == [1.0, 10.0]
        assert o["dp"] == (r, 2) and o["tp_dp2"] == 1
        assert o["dsum"] == [3.0, 30.0] and o["dmean"] == [1.5, 15.0] and o["gather"] == [0, 1]
