"""The kbsync daemon: the service (facts, versions and the live model), its runtime and scheduler, the HTTP APIs
(admin and OpenAI-compatible serving) and the ``kbsync`` command line."""
