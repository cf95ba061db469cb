"""The kbsync daemon: the service (facts, versions and the live model), its runtime and scheduler, the HTTP APIs
(admin and OpenAI-compatible serving), the ``kbsync`` command line, and the vLLM plugin (``daemon.vllm``,
which runs inside vLLM, never in the daemon)."""
