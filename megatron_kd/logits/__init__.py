"""Teacher-logits store: format (codec, shards, manifest), precompute, reader, dataset wrapper.

Public API::

    from megatron_kd.logits import LogitsStore, TeacherTargetsDataset, verify_store
    from megatron_kd.logits import PrecomputeConfig, precompute_logits

See ``docs/logits_store.md``.
"""
from megatron_kd.logits.dataset import TeacherTargetsDataset, sample_positions, sample_targets
from megatron_kd.logits.store import LogitsStore, verify_store


def __getattr__(name):
    # The precompute side imports megatron's training stack; load it only when asked for.
    if name in ("PrecomputeConfig", "precompute_logits", "finalize_manifest"):
        from megatron_kd.logits import precompute

        return getattr(precompute, name)
    raise AttributeError(name)


__all__ = ["LogitsStore", "PrecomputeConfig", "TeacherTargetsDataset", "precompute_logits", "sample_positions",
           "sample_targets", "verify_store"]
