"""Servers and programs the tests run beside them: an in-memory Hugging Face Hub, a fault-injecting HTTP
proxy, and one training job of the multi-process tests (run as a script)."""
