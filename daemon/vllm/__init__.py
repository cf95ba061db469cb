"""kbsync's vLLM plugin: serve the ledger's versions with the per-token gate, and follow HEAD (docs/serving.md).

Installed as the ``vllm.general_plugins`` entry point ``kbsync`` (``plugin.register``). vLLM loads it in every
process it starts: the API server (``system_fingerprint`` names the served version), the engine core (polls
HEAD between steps and moves every worker to it) and the workers (the gated down projections). Nothing here
runs in the kbsync daemon; ``gate`` and ``versions`` import no vLLM, so the main test suite checks them.
"""
