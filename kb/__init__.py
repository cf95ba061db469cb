"""The knowledge base: facts, change log, drop folder and ledger. Never imports torch."""
