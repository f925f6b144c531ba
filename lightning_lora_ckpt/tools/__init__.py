"""Tools layer: user-facing entry points (merge/export, the command line): see docs/architecture.md."""
