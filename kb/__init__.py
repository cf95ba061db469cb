"""The knowledge base: facts, change log, drop folder and ledger. Never imports torch.

Public API (what the daemon calls)::

    from kb import FactStore, DropFolder
    store = FactStore(state_dir / "kb.sqlite")
    store.import_file(path) / store.add(subject, prompt, target) / store.remove(subject, prompt)
    batch = store.next_batch(30); store.mark_applied(batch.change_ids, version_id) / store.mark_failed(ids, why)
    store.counts()  # facts, pending, pending_keys, failed, applied
    drops = DropFolder(store, state_dir / "inbox"); drops.start(); ...; drops.stop()
"""
from .drops import DropFolder, DropOutcome
from .errors import ChangeStateError, FactNotFoundError, InvalidFactsError, KBError, MigrationError
from .facts import FactStore
from .records import (BadRecord, Batch, BatchEntry, Change, Counts, Fact, ImportResult, LocalityProbe,
                      Provenance)
from .validation import DIALECTS, MAX_FIELD_CHARS, ParsedFile, parse_fact_file

__all__ = ["BadRecord", "Batch", "BatchEntry", "Change", "ChangeStateError", "Counts", "DIALECTS", "DropFolder",
           "DropOutcome", "Fact", "FactNotFoundError", "FactStore", "ImportResult", "InvalidFactsError", "KBError",
           "LocalityProbe", "MAX_FIELD_CHARS", "MigrationError", "ParsedFile", "Provenance", "parse_fact_file"]
