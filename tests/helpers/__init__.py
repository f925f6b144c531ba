"""Helpers the tests import (``from helpers.<module> import ...``; ``tests/`` is on pytest's ``pythonpath``).

- ``training``: the tiny module's settings, synthetic token batches, quiet CPU trainers;
- ``checkpoints``: checkpoint dicts built without a model, and a small populated store;
- ``compare``: deep equality of checkpoint state;
- ``storage``: a failing in-memory object store, and a moto S3 server on loopback;
- ``cli``: the command line in a subprocess;
- ``resume``: the shuffled 16-step training run the resume tests repeat in new processes;
- ``saves``: real checkpoint dicts, plans of saves in forked processes, and checks of what a store holds;
- ``races``: two spawned processes racing metadata updates, deletions, gc and overwrites round by round;
- ``overwrites``: a writer process overwriting one checkpoint with two versions while readers load it;
- ``user_module``: a LightningModule of a user's own, with the plugin (also a training job script).
"""
