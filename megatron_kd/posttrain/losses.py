"""MiniLLM's loss terms, vocab-parallel, per token (shapes [b, T] unless noted).

Notation: student q_theta, teacher p, sampling distribution p~ = (1 - alpha) q + alpha p.
All functions take TP-sharded logits [b, T, V/tp] whose padded columns are already -inf.

* :func:`token_log_probs` -- log q(y_t): megatron's vocab-parallel cross entropy (analytic grad).
* :func:`single_step_reverse_kl` -- KL(q(.|y<t) || p(.|y<t)) summed exactly over the vocabulary,
  with an analytic, recomputing backward (nothing [T, V] is kept for autograd).
* :func:`mixture_log_prob`, :func:`importance_weights` -- log p~(y_t) and w_t = q(y_t)/p~(y_t)
  (the single-step approximation of the sequence importance weight).
* :func:`normalized_returns` -- length-normalised (optionally discounted) long-term returns.
* :func:`whiten` -- masked advantage whitening, optionally over the data-parallel group.
* :func:`ppo_clipped_surrogate` -- PPO clip on rho_t = q_theta(y_t) / p~(y_t).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_kd.posttrain import vocab as vp


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets], differentiable. logits [b, T, V/tp]; targets [b, T] global ids.

    megatron's ``vocab_parallel_cross_entropy`` overwrites its input with the softmax, so it gets a
    copy: callers may reuse ``logits`` (e.g. for the single-step or KD terms) afterwards.
    """
    return -vocab_parallel_cross_entropy(logits.float().clone(), targets)


class _SingleStepReverseKL(torch.autograd.Function):
    """KL(q || p) over the (sharded) vocabulary, gradient w.r.t. the student logits only.

    d KL / d s_v = q_v (log q_v - log p_v - KL). The backward recomputes the softmaxes from the
    saved logits instead of keeping [T, V] intermediates alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        kl = _reverse_kl_values(student, teacher)
        ctx.save_for_backward(student, teacher, kl)
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher, kl = ctx.saved_tensors
        lq = vp.log_softmax(student.float())
        lp = vp.log_softmax(teacher.float())
        q = lq.exp()
        diff = torch.where(q > 0, lq - lp, torch.zeros_like(lq))
        g = q * (diff - kl.unsqueeze(-1)) * grad.unsqueeze(-1)
        return g.to(student.dtype), None


def _reverse_kl_values(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    lq = vp.log_softmax(student.detach().float())
    lp = vp.log_softmax(teacher.detach().float())
    q = lq.exp()
    # 0 * log 0 = 0; where the teacher has -inf but q > 0 the KL is infinite (kept).
    terms = torch.where(q > 0, q * (lq - lp), torch.zeros_like(q))
    return vp.all_reduce_sum(terms.sum(dim=-1))


def single_step_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position reverse KL, KL(q(.|y<t) || p(.|y<t)) -> [b, T] (float32).

    Gradient flows to ``student_logits`` only (the teacher is frozen).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: teacher and student need the same padded vocab")
    return _SingleStepReverseKL.apply(student_logits, teacher_logits.detach())


def mixture_log_prob(logq: torch.Tensor, logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p~(y_t) = log((1 - alpha) q(y_t) + alpha p(y_t)) from token log-probs (no gradient)."""
    logq, logp = logq.detach().double(), logp.detach().double()
    if alpha <= 0:
        return logq
    if alpha >= 1:
        return logp
    return torch.logaddexp(logq + math.log1p(-alpha), logp + math.log(alpha))


def importance_weights(logq: torch.Tensor, logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_t = q(y_t) / p~(y_t), the paper's single-step approximation of the sequence weight."""
    return torch.exp(logq.detach().double() - mixture_log_prob(logq, logp, alpha))


def normalized_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       include_current: bool = True, length_norm: bool = True) -> torch.Tensor:
    """Long-term returns R_t = sum_{t' in S_t} gamma^(t'-t') r_t' over the response, per token.

    ``S_t`` is {t' >= t} (``include_current``, the reference code) or {t' > t} (the paper's
    R_{t+1}). With ``length_norm`` R_t is divided by |S_t| (the number of valid response tokens
    it sums; empty sums stay 0). ``rewards``, ``mask``: [b, T]; masked positions return 0.
    Computed in float64.
    """
    r = rewards.detach().double() * mask
    m = mask.double()
    T = r.shape[-1]
    out = torch.zeros_like(r)
    cnt = torch.zeros_like(r)
    run = torch.zeros_like(r[:, 0])
    run_n = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        if include_current:
            run = r[:, t] + gamma * run
            run_n = m[:, t] + run_n
            out[:, t], cnt[:, t] = run, run_n
        else:
            out[:, t], cnt[:, t] = gamma * run, run_n
            run = r[:, t] + gamma * run
            run_n = m[:, t] + run_n
    if length_norm:
        out = out / cnt.clamp(min=1)
    return out * m


def whiten(values: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid (mask=1) entries, across ``group`` if given.

    Masked entries are returned as 0. Population variance (as the reference's ``whiten``).
    """
    x = values.double()
    m = mask.double()
    stats = torch.stack([(x * m).sum(), m.sum()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    mean = stats[0] / stats[1].clamp(min=1)
    sq = (((x - mean) ** 2) * m).sum()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    var = sq / stats[1].clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def ppo_clipped_surrogate(logq: torch.Tensor, log_behaviour: torch.Tensor, advantages: torch.Tensor,
                          clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss max(-A rho, -A clip(rho, 1-eps, 1+eps)) with rho = exp(logq - log_behaviour).

    ``log_behaviour`` = log p~(y_t) of the sampling distribution, so rho = q_theta/q_old * w_t
    (the reference clips this combined ratio). Returns (loss [b, T], clipped-indicator [b, T]).
    """
    ratio = torch.exp(logq.float() - log_behaviour.detach().float())
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).float()


def token_rewards(logp_teacher: torch.Tensor, logq_student: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """r_t = (log p(y_t) - log q(y_t)) * scale (the reference's --reward-scaling 0.5 means scale 2)."""
    return (logp_teacher.detach().double() - logq_student.detach().double()) * scale


def minillm_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                       log_behaviour: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor | None = None,
                       clip: float = 0.2, single_step_coef: float = 1.0,
                       single_step_importance_weight: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token MiniLLM loss [b, T] = PPO surrogate + c * (w_t) * KL(q_t || p_t), and its parts.

    ``student_logits``: [b, T, V/tp] (padded columns -inf), differentiable; ``teacher_logits``
    (same shape) or None to drop the single-step term; ``labels`` the sampled ids; the rest [b, T]
    from the rollout. Parts: ``pg``, ``clipped``, ``ratio``, ``single_step`` (detached).
    """
    logq = token_log_probs(student_logits, labels)
    pg, clipped = ppo_clipped_surrogate(logq, log_behaviour, advantages, clip)
    parts = {"pg": pg.detach(), "clipped": clipped,
             "ratio": torch.exp(logq.detach() - log_behaviour.detach().float())}
    loss = pg
    if teacher_logits is not None and single_step_coef != 0:
        kl = single_step_reverse_kl(student_logits, teacher_logits)
        w = weights.detach().float() if single_step_importance_weight else 1.0
        loss = loss + single_step_coef * w * kl
        parts["single_step"] = kl.detach()
    return loss, parts


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log q_v per position [b, T] (vocab-parallel, differentiable in the student logits).

    The reference's forward-KD half of L_PT; equals KL(p || q) + H(p), so it has the same gradient.
    """
    lq = vp.log_softmax(student_logits, differentiable=True)
    p = vp.log_softmax(teacher_logits.detach().float()).exp()
    terms = torch.where(p > 0, p * lq, torch.zeros_like(lq))
    return -vp.all_reduce_sum(terms.sum(-1), differentiable=True)
