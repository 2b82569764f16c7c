"""Data: tokenizers, preprocessing into indexed datasets, GPT datasets, the embedded demo corpus."""
