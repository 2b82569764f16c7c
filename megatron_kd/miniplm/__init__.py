"""MiniPLM difference sampling: scoring and selection."""
