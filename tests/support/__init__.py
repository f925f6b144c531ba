"""Servers and programs the tests run beside them: an in-memory Hugging Face Hub, a fault-injecting HTTP
proxy, a GCS emulator (fake-gcs-server behind a proxy that honours generation preconditions on deletes),
and one training job of the multi-process tests (run as a script)."""
