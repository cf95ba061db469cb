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
import importlib

#: Where each public name lives. Imported on first use (PEP 562), so ``from kb import KBError`` does not pull in
#: numpy, safetensors or watchdog: a command line that only needs the errors starts quickly.
_WHERE = {
    **dict.fromkeys(("DropFolder", "DropOutcome"), "drops"),
    **dict.fromkeys(("BlobError", "ChangeStateError", "FactNotFoundError", "InvalidFactsError", "KBError",
                     "MigrationError", "ModelMismatchError", "VersionNotFoundError", "VersionPrunedError"), "errors"),
    "FactStore": "facts",
    **dict.fromkeys(("BLOB_FORMAT", "Ledger"), "ledger"),
    **dict.fromkeys(("BadRecord", "Batch", "BatchEntry", "Change", "Counts", "Fact", "HeadMove", "ImportResult",
                     "LocalityProbe", "Provenance", "PruneReport", "Version"), "records"),
    **dict.fromkeys(("DIALECTS", "MAX_FIELD_CHARS", "ParsedFile", "parse_fact_file"), "validation"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kb' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
