"""Storage layer (fsspec): the commit protocol, verified reads, metadata updates, ``CheckpointStore``, archives.

See docs/architecture.md.
"""
