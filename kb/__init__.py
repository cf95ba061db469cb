"""The knowledge base: facts, change log, drop folder and ledger. Never imports torch.

Public API (what the daemon calls)::

    from kb import FactStore, DropFolder
    store = FactStore(state_dir / "kb.sqlite")
    store.import_file(path) / store.add(subject, prompt, target) / store.remove(subject, prompt)
    batch = store.next_batch(30); store.mark_applied(batch.change_ids, version_id) / store.mark_failed(ids, why)
    store.counts()  # facts, pending, pending_keys, failed, applied
    drops = DropFolder(store, state_dir / "inbox"); drops.start(); ...; drops.stop()
    ledger = Ledger(store, state_dir / "blobs")
    version = ledger.commit(arrays, meta, batch.change_ids, config_digest=..., model_fingerprint=..., metrics={},
                            actor="daemon", reason="tick")
    arrays, meta = ledger.load(version.id, expect_fingerprint=...); ledger.move_head(3, actor=..., reason=...)
"""
from .drops import DropFolder, DropOutcome
from .errors import (BlobError, ChangeStateError, FactNotFoundError, InvalidFactsError, KBError, MigrationError,
                     ModelMismatchError, VersionNotFoundError)
from .facts import FactStore
from .ledger import BLOB_FORMAT, Ledger
from .records import (BadRecord, Batch, BatchEntry, Change, Counts, Fact, HeadMove, ImportResult, LocalityProbe,
                      Provenance, Version)
from .validation import DIALECTS, MAX_FIELD_CHARS, ParsedFile, parse_fact_file

__all__ = ["BLOB_FORMAT", "BadRecord", "Batch", "BatchEntry", "BlobError", "Change", "ChangeStateError", "Counts",
           "DIALECTS", "DropFolder", "DropOutcome", "Fact", "FactNotFoundError", "FactStore", "HeadMove",
           "ImportResult", "InvalidFactsError", "KBError", "Ledger", "LocalityProbe", "MAX_FIELD_CHARS",
           "MigrationError", "ModelMismatchError", "ParsedFile", "Provenance", "Version", "VersionNotFoundError",
           "parse_fact_file"]
