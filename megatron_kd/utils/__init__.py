"""Small shared helpers: atomic file writes, checksums, progress and JSONL metrics."""
