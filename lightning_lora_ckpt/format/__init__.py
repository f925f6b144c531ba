"""Format layer: pure data (names and URIs, the manifest, the pickle-free state codec, adapter files).

No fsspec, no Lightning: see docs/architecture.md.
"""
