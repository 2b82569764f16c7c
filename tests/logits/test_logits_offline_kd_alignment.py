"""Offline KD end to end against an independent float64 reference: a store written by
``precompute_logits`` from a tiny teacher, read through megatron GPTDataset samples
(``TeacherTargetsDataset``), and the distillation forward step's loss and gradients (fused output
layer and unfused) on that batch.

The reference never touches the store's reader or the loss kernels: the teacher's float64
log-softmax of every document by the documented window rule, restricted to the stored ids of each
position and renormalised (or, ``kd.residual``, kept as is plus the remainder bucket), against the
student's float64 softmax. A store keyed one position off (KD pulling the student to the token
after the label, or to the label's predecessor) would miss the reference by far more than the
quantisation step, which the test checks too.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import logits_testlib as L
from dist_helpers import run_workers

STUDENT = dict(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64,
               vocab_size=L.TEACHER["vocab_size"], max_position_embeddings=256)
SEQ, BATCH = 48, 6
CASES = [(1.0, False, True), (2.0, False, True), (1.0, True, True), (1.0, False, False)]  # (T, residual, fused)


def _reference_kd(logits, ids, tvals, temperature, residual):
    """Per-token forward KL [b, s] from the stored ids with float64 teacher values ``tvals``."""
    zero = torch.zeros((), dtype=torch.float64)
    valid = ids >= 0
    lq_t = torch.log_softmax(logits / temperature, -1).gather(-1, ids.clamp_min(0))
    if residual:
        p = torch.where(valid, tvals.exp(), zero)
        q = torch.where(valid, lq_t.exp(), zero)
        kept = torch.where(valid, p * (tvals - lq_t), zero).sum(-1)
        rp, rq = (1 - p.sum(-1)).clamp_min(0), 1 - q.sum(-1)
        return kept + torch.where(rp > 0, rp * (rp.clamp_min(1e-300).log() - rq.log()), zero)
    a = torch.where(valid, tvals / temperature, torch.tensor(float("-inf"), dtype=torch.float64))
    a = torch.where(valid.any(-1, keepdim=True), a, zero)
    lp = torch.where(valid, a - torch.logsumexp(a, -1, keepdim=True), zero)
    p = torch.where(valid, lp.exp(), zero)
    return torch.where(valid, p * (lp - lq_t), zero).sum(-1)


def _worker(rank, world_size, base):
    from megatron_kd.distill import DistillForwardStep, KDConfig
    from megatron_kd.logits import TeacherTargetsDataset, sample_positions
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    ckpt, prefix, store = (os.path.join(base, n) for n in ("ckpt", "ds", "store"))
    L.make_teacher(rank, world_size, ckpt)
    L.precompute_worker(rank, world_size, 1, 1, ckpt, prefix, store, {})
    init_distributed(ParallelConfig())
    ref = L.reference_worker(rank, world_size, ckpt, prefix)  # float64 [L-1, V] per document
    gds = L.gpt_dataset(prefix, 7, SEQ, 40, L.cache_dir(base))
    targets = TeacherTargetsDataset(gds, store)
    picks = list(range(0, len(targets), max(1, len(targets) // BATCH)))[:BATCH]
    samples = [targets[i] for i in picks]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids",
                                                                "target_ids", "target_logprobs")}
    # The teacher's float64 values at the stored ids, and at the ids of the neighbouring positions.
    V = L.TEACHER["vocab_size"]
    dense = torch.full((BATCH, SEQ, V), float("nan"), dtype=torch.float64)
    for r, idx in enumerate(picks):
        docs, offs = sample_positions(gds, idx)
        for j in range(SEQ):
            d, o = int(docs[j]), int(offs[j])
            if d >= 0 and o < len(ref[d]):
                dense[r, j] = torch.from_numpy(ref[d][o])
    ids = batch["target_ids"].long()
    has = (ids >= 0).any(-1)
    assert not torch.isnan(dense[has]).any()  # every stored position has its reference row
    lab_lp = dense.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)

    set_seed(5)
    student = build_gpt_model(ModelConfig(**STUDENT))
    s64 = build_gpt_model(ModelConfig(**STUDENT))
    s64.load_state_dict(student.state_dict())
    s64 = s64.double()
    out = {"stored_positions": int(has.sum()), "label_lp": float(lab_lp[has].mean()), "cases": []}
    for temperature, residual, fused in CASES:
        kd = KDConfig(alpha=0.5, temperature=temperature, residual=residual, fused_linear=fused)
        student.zero_grad(set_to_none=True)
        output, loss_func = DistillForwardStep("offline", kd, V)(iter([batch]), student)
        loss_sum, _, report = loss_func(output)
        loss_sum.backward()
        grads = {n: p.grad.detach().double().clone() for n, p in student.named_parameters()}

        s64.zero_grad(set_to_none=True)
        logits = s64(batch["tokens"], batch["position_ids"], None)[..., :V]
        mask = batch["loss_mask"].bool()
        ce = F.cross_entropy(logits.reshape(-1, V), batch["labels"].reshape(-1), reduction="none").view(mask.shape)
        res = {"T": temperature, "residual": residual, "fused": fused, "loss": loss_sum.item(),
               "kd": report["kd"][0].item()}
        for shift in (0, -1, 1):  # the teacher rows of position j + shift at the stored ids of position j
            rows = torch.roll(dense, shifts=-shift, dims=1).nan_to_num(0.0)
            tvals = rows.gather(-1, ids.clamp_min(0))
            kd_ref = _reference_kd(logits, ids, tvals, temperature, residual)
            total = (0.5 * kd_ref + 0.5 * ce)[mask].sum()
            res[f"ref_loss_{shift}"] = total.item()
            res[f"ref_kd_{shift}"] = kd_ref[mask].sum().item()
            if shift == 0:
                total.backward()
                res["grad_rel"] = max(((grads[n] - p.grad).norm() / p.grad.norm()).item()
                                      for n, p in s64.named_parameters())
        out["cases"].append(res)
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("offline_kd_alignment"))
    L.make_dataset(os.path.join(base, "ds"))
    return run_workers(_worker, 1, base, timeout=600)[0]


def test_offline_kd_loss_and_gradients_match_float64_teacher(result):
    assert result["stored_positions"] > BATCH * SEQ // 2
    for case in result["cases"]:
        # The stored values are quantised (step 1/16 nat): the reference uses the unquantised teacher.
        assert case["loss"] == pytest.approx(case["ref_loss_0"], rel=2e-3), case
        assert case["kd"] == pytest.approx(case["ref_kd_0"], rel=5e-3, abs=0.05 * SEQ), case
        assert case["grad_rel"] < 2e-2, case


def test_offline_kd_targets_are_not_shifted(result):
    for case in result["cases"]:
        for shift in (-1, 1):
            gap = abs(case[f"ref_kd_{shift}"] - case["kd"])
            assert gap > 20 * abs(case["ref_kd_0"] - case["kd"]) + 1.0, (shift, case)
