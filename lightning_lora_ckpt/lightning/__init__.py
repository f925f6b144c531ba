"""Lightning layer: the only layer that imports Lightning (the plugin, LoRAModule, callbacks, strategies, data).

See docs/architecture.md.
"""
