"""Evaluation: held-out LM loss, zero-shot multiple choice, ROUGE-L."""
