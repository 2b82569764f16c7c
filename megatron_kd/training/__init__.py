"""Training loop on megatron-core schedules: DDP, optimizer, LR schedules, checkpoints, logging."""
