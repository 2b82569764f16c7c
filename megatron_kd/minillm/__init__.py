"""MiniLLM: rollouts, policy-gradient losses, trainer; SFT / KD / SeqKD baselines; GKD, DistiLLM."""
