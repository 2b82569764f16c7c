"""Distillation losses: vocab-parallel divergences, sparse targets, the distillation loss layer."""
