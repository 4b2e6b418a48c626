"""The tape daemon: archives copies to tape pools in batches, one mount per batch, when a pool's
queue is worth it (bytes, files or age of the oldest request)."""
