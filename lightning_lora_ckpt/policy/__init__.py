"""Policy layer: pure decisions over lists of ``Checkpoint`` records (no storage): see docs/architecture.md."""
