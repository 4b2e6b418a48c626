"""The replicator: makes the copies replication rules ask for, verified, and keeps endpoints healthy."""
