"""Batched autoregressive generation for megatron-core ``GPTModel`` stages, under TP and PP.

* KV cache: megatron-core's ``StaticInferenceContext`` (the model's own attention layers fill and
  read it); we call ``_preprocess`` / ``decoder`` / ``output_layer`` ourselves so the logits
  stay vocab-parallel (``GPTModel.forward`` insists on gathering them in inference mode).
* Variable prompt lengths without attention masks: prompts are right-padded and every sequence
  advances in lockstep from the shortest prompt; while a sequence is still inside its prompt the
  sampled token is replaced by its prompt token (megatron's static engine does the same). RoPE
  positions are then the true positions of every sequence, so the result equals unbatched decoding.
* Per-sequence stop at EOS or ``max_new_tokens``; finished sequences are dropped from the batch
  (and from the KV cache) once at most half of the cached rows are still running.
* Sampling is vocab-parallel Gumbel-max keyed by (seed, sequence id, position): the same seed gives
  the same samples at TP=1 and TP=2 (see :mod:`megatron_kd.posttrain.sampling`).
* Teacher-mixed sampling: a teacher stepped in lockstep with its own KV cache, next token drawn
  from (1 - alpha) q + alpha p.
* Pipeline parallel: hidden states go stage to stage with point-to-point sends; the last stage
  samples and broadcasts the token to the pipeline group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.posttrain.sampling import SamplingConfig, sample_next


@dataclass
class GenerationConfig:
    """What to generate and how to stop."""

    max_new_tokens: int = 128
    """Most tokens generated per sequence (EOS included)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature / top-k / top-p / greedy."""
    eos_id: int | None = None
    """Generation of a sequence stops after this id (None: only at max_new_tokens)."""
    pad_id: int = 0
    """Filler written after a sequence ends."""
    seed: int = 0
    """Seed of the sampling noise (with the sequence id and position)."""
    use_cache: bool = True
    """KV-cache incremental decoding (False recomputes the whole prefix each step)."""
    compact: bool = True
    """Drop finished sequences from the running batch."""


@dataclass
class GenerationOutput:
    """Right-padded prompt+response token matrix and lengths (identical on every rank)."""

    tokens: torch.Tensor
    """[b, L] prompt followed by response, then ``pad_id``."""
    prompt_lengths: torch.Tensor
    """[b] prompt lengths."""
    response_lengths: torch.Tensor
    """[b] generated tokens per sequence (EOS included when generated)."""

    def responses(self) -> list[list[int]]:
        """The generated ids of every sequence."""
        out = []
        for row, p, n in zip(self.tokens.tolist(), self.prompt_lengths.tolist(), self.response_lengths.tolist()):
            out.append(row[p:p + n])
        return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _pp() -> tuple[bool, bool, int]:
    if not parallel_state.model_parallel_is_initialized():
        return True, True, 1
    return (parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(),
            parallel_state.get_pipeline_model_parallel_world_size())


def stage_forward(model: torch.nn.Module, tokens: torch.Tensor, start: int = 0,
                  ctx: StaticInferenceContext | None = None, last_only: bool = False) -> torch.Tensor | None:
    """Run this pipeline stage on ``tokens`` [b, s] at positions start..start+s-1 (no autograd).

    Receives/sends hidden states from/to the neighbouring stages. On the last stage returns the
    vocab-parallel logits [b, s, V/tp] (or [b, 1, V/tp] with ``last_only``), else None.
    With ``ctx`` the KV cache is filled and ``ctx.sequence_len_offset`` advanced by s.
    """
    model = _unwrap(model)
    first, last, pp = _pp()
    b, s = tokens.shape
    pos = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)
    if not first:
        cfg = model.config
        h_in = torch.empty(s, b, cfg.hidden_size, dtype=cfg.params_dtype, device=tokens.device)
        dist.recv(h_in, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(h_in)
    with torch.no_grad():
        if ctx is None:
            out = model(tokens, pos, None)
            if last and last_only:
                out = out[:, -1:]
        else:
            dec_in, rope = model._preprocess(tokens, pos, inference_context=ctx)[:2]
            out = model.decoder(hidden_states=dec_in, attention_mask=None, inference_context=ctx,
                                rotary_pos_emb=rope)
            ctx.sequence_len_offset += s
            if last:
                h = out[-1:] if last_only else out
                weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
                out, _ = model.output_layer(h, weight=weight)
                out = out.transpose(0, 1)
    if not last:
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return out


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full no-grad forward -> masked vocab-parallel logits [b, s, V/tp] on the last stage, else None."""
    out = stage_forward(model, tokens)
    return None if out is None else mask_padded_vocab(out.float(), vocab_size)


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    _, _, pp = _pp()
    if pp > 1:
        dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return t


def _compact_cache(ctx: StaticInferenceContext | None, keep: torch.Tensor) -> None:
    if ctx is None:
        return
    for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
        ctx.key_value_memory_dict[layer] = (k[:, keep].contiguous(), v[:, keep].contiguous())
    ctx.max_batch_size = int(keep.numel())


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("generate() got no prompts: pass at least one non-empty prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if max(p) >= vocab_size or min(p) < 0:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): tokenizer and model do not match")


def generate(model: torch.nn.Module, prompts: list[list[int]], cfg: GenerationConfig, vocab_size: int,
             teacher: torch.nn.Module | None = None, mix_alpha: float = 0.0,
             sample_ids: torch.Tensor | None = None) -> GenerationOutput:
    """Generate continuations of ``prompts`` (lists of token ids) with ``model`` (this rank's stage).

    ``vocab_size``: real vocabulary (padded columns never sampled). ``teacher`` + ``mix_alpha``:
    teacher-mixed sampling. ``sample_ids`` [b]: ids keying the sampling noise (default 0..b-1);
    give each prompt a globally unique id to make samples independent of batching and DP layout.
    Collective over TP and PP; every rank gets the same output.
    """
    cfg.sampling.validate()
    _check_prompts(prompts, vocab_size)
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha={mix_alpha} must be in [0, 1]")
    _, last, _ = _pp()
    dev = next(_unwrap(model).parameters()).device
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    limit = lens + cfg.max_new_tokens
    total = int(limit.max())
    tokens = torch.full((b, total), cfg.pad_id, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=dev)
    rows = torch.arange(b, device=dev) if sample_ids is None else sample_ids.to(dev, torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    resp = torch.zeros(b, dtype=torch.long, device=dev)
    active = torch.arange(b, device=dev)
    models = [model] + ([teacher] if teacher is not None and mix_alpha > 0 else [])
    modes = [_unwrap(m).training for m in models]
    for m in models:
        m.eval()
    ctxs = [StaticInferenceContext(b, total) if cfg.use_cache else None for _ in models]
    t = int(lens.min())
    try:
        logits = [stage_forward(m, tokens[:, :t], 0, c, last_only=True) for m, c in zip(models, ctxs)]
        while t < total and cfg.max_new_tokens > 0:
            nxt = torch.zeros(active.numel(), dtype=torch.long, device=dev)
            if last:
                lg = [mask_padded_vocab(x[:, -1].float(), vocab_size) for x in logits]
                nxt = sample_next(lg[0], cfg.sampling, cfg.seed, rows[active], t,
                                  lg[1] if len(lg) > 1 else None, mix_alpha)
            nxt = _broadcast_from_last_stage(nxt)
            forced = t < lens[active]
            tok = torch.where(forced, tokens[active, t], nxt)
            finished_before = done[active]
            tok = torch.where(finished_before, torch.full_like(tok, cfg.pad_id), tok)
            tokens[active, t] = tok
            generated = ~forced & ~finished_before
            resp[active] += generated.long()
            stop = t + 1 >= limit[active]
            if cfg.eos_id is not None:
                stop = stop | (tok == cfg.eos_id)
            done[active] = finished_before | (generated & stop)
            t += 1
            if bool(done.all()) or t >= total:
                break
            running = ~done[active]
            if cfg.compact and int(running.sum()) <= active.numel() // 2:
                keep = running.nonzero().squeeze(1)
                active = active[keep]
                for c in ctxs:
                    _compact_cache(c, keep)
            if cfg.use_cache:
                logits = [stage_forward(m, tokens[active, t - 1:t], t - 1, c, last_only=True)
                          for m, c in zip(models, ctxs)]
            else:
                logits = [stage_forward(m, tokens[active, :t], 0, None, last_only=True) for m in models]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    width = int((lens + resp).max())
    return GenerationOutput(tokens=tokens[:, :width].clone(), prompt_lengths=lens, response_lengths=resp)
