"""Teacher-logits store: format, writer, reader, precompute."""
