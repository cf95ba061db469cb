"""The fact-file schema: raw records (native, COUNTERFACT or zsRE) -> validated ``Fact``s, or every problem.

A file is valid only as a whole: ``parse_fact_file`` returns all its facts or raises ``InvalidFactsError``
naming every bad record. Two records with one key (subject, prompt template) and different targets are a
conflict; the same fact twice is fine (the last one's paraphrases and probes win).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidFactsError
from .formats import FormatError, RawRecord, read_records
from .records import SLOT, BadRecord, Fact, LocalityProbe, Provenance

#: The longest text a field may hold, in characters.
MAX_FIELD_CHARS = 65_536
DIALECTS = ("native", "counterfact", "zsre")
NATIVE_FIELDS = ("subject", "prompt", "target", "paraphrases", "locality")
NATIVE_IGNORED = ("id", "comment")
ZSRE_LOC_PREFIX = "nq question: "


@dataclass(frozen=True)
class ParsedFile:
    """A validated fact file: its facts (one per key, first-seen order), record count, sha256 and dialect."""

    facts: tuple[Fact, ...]
    records: int
    sha256: str
    dialect: str


def parse_fact_file(data: bytes, source: str, *, name: str | None = None, fmt: str | None = None,
                    dialect: str | None = None, at: str | None = None) -> ParsedFile:
    """Validate a whole fact file. ``name`` (default: ``source``) picks the format by extension."""
    sha = hashlib.sha256(data).hexdigest()
    at = at or now_iso()
    try:
        raw, problems = read_records(data, name or source, fmt)
    except FormatError as e:
        raise InvalidFactsError(source, e.problems) from None
    if dialect in (None, "auto"):
        dialect = detect_dialect(raw)
    to_fields = _to_fields(dialect, source)
    facts: dict[tuple[str, str], tuple[Fact, RawRecord]] = {}
    for rec in raw:
        bad: list[BadRecord] = []
        fact = _fact(rec, to_fields, Provenance(source, sha, rec.number, at), bad)
        if fact is not None:
            seen = facts.get(fact.key)
            if seen is not None and seen[0].target != fact.target:
                bad.append(BadRecord(rec.number, rec.line, "target", f"conflicts with record {seen[1].number}: "
                                     f"target {_short(fact.target)} here but {_short(seen[0].target)} there, for "
                                     f"the same subject and prompt"))
            else:
                facts[fact.key] = (fact, seen[1] if seen else rec)
        problems += bad
    if problems:
        raise InvalidFactsError(source, sorted(problems, key=_position))
    return ParsedFile(tuple(f for f, _ in facts.values()), len(raw), sha, dialect)


def validate_fact(fields: dict[str, Any], provenance: Provenance) -> Fact:
    """Validate one fact given as native fields (``facts add``); raises ``InvalidFactsError``."""
    bad: list[BadRecord] = []
    fact = _fact(RawRecord(1, None, fields), _native, provenance, bad)
    if fact is None:
        raise InvalidFactsError(provenance.source, bad)
    return fact


def validate_record(value: Any, dialect: str, source: str, number: int) -> Fact:
    """Validate one raw record of ``dialect`` on its own (the benchmark reads datasets record by record, where a
    file may repeat a key with another target); raises ``InvalidFactsError`` naming its problems."""
    to_fields = _to_fields(dialect, source)
    bad: list[BadRecord] = []
    fact = _fact(RawRecord(number, None, value), to_fields, Provenance(source, None, number), bad)
    if fact is None:
        raise InvalidFactsError(source, bad)
    return fact


def _to_fields(dialect: str, source: str):
    """The mapping of ``dialect``'s records to native fields; ``InvalidFactsError`` for an unknown dialect."""
    if dialect not in DIALECTS:
        raise InvalidFactsError(source, [BadRecord(None, None, None, f"unknown dialect {dialect!r}; use one of "
                                                   f"{', '.join(DIALECTS)}")])
    return _DIALECTS[dialect]


def detect_dialect(raw: list[RawRecord]) -> str:
    """COUNTERFACT if the first record has ``target_new``, zsRE if it has ``src`` and ``alt``, else native."""
    first = next((r.value for r in raw if isinstance(r.value, dict)), {})
    if "target_new" in first:
        return "counterfact"
    if "src" in first and "alt" in first:
        return "zsre"
    return "native"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- dialects: a raw mapping -> native fields (subject, prompt, target, paraphrases, locality) -------------------

def _native(value: dict, bad: list[BadRecord], where: RawRecord) -> dict:
    for k in value:
        if k not in NATIVE_FIELDS and k not in NATIVE_IGNORED:
            bad.append(BadRecord(where.number, where.line, str(k), "unknown field; a fact has "
                                 f"{', '.join(NATIVE_FIELDS)} (did you mean another dialect? see docs/facts.md)"))
    return value


def _counterfact(value: dict, bad: list[BadRecord], where: RawRecord) -> dict:
    fields = {"subject": value.get("subject"), "prompt": value.get("prompt"), "target": value.get("target_new")}
    if value.get("rephrase_prompt") not in (None, "", []):
        fields["paraphrases"] = value["rephrase_prompt"]
    loc, ans = value.get("locality_prompt"), value.get("locality_ground_truth")
    if loc not in (None, "", []):
        fields["locality"] = _pair_probes(loc, ans, bad, where, "locality_ground_truth")
    return _renamed(fields, {"target": "target_new", "paraphrases": "rephrase_prompt",
                             "locality": "locality_prompt"})


def _zsre(value: dict, bad: list[BadRecord], where: RawRecord) -> dict:
    fields = {"subject": value.get("subject"), "prompt": value.get("src"), "target": value.get("alt")}
    if value.get("rephrase") not in (None, "", []):
        fields["paraphrases"] = value["rephrase"]
    loc = value.get("loc")
    if isinstance(loc, str) and loc.startswith(ZSRE_LOC_PREFIX):
        loc = loc[len(ZSRE_LOC_PREFIX):]
    if loc not in (None, "", []):
        fields["locality"] = _pair_probes(loc, value.get("loc_ans"), bad, where, "loc_ans")
    return _renamed(fields, {"prompt": "src", "target": "alt", "paraphrases": "rephrase", "locality": "loc"})


class _renamed(dict):
    """Native fields that remember the dialect's own field names, so reports use the names in the file."""

    def __init__(self, fields: dict, names: dict[str, str]):
        super().__init__({k: v for k, v in fields.items() if v is not None})
        self.names = names


def _pair_probes(prompts: Any, answers: Any, bad: list[BadRecord], where: RawRecord, field: str) -> Any:
    if isinstance(prompts, str):
        prompts = [prompts]
        answers = [answers] if isinstance(answers, str) or answers is None else answers
    if not isinstance(prompts, list):
        return prompts                      # _fact reports the type
    if answers is None:
        return prompts
    if not isinstance(answers, list) or len(answers) != len(prompts):
        bad.append(BadRecord(where.number, where.line, field, "must match the locality prompts one to one"))
        return prompts
    return [{"prompt": p, "target": a} if a not in (None, "") else p for p, a in zip(prompts, answers)]


_DIALECTS: dict[str, Callable[[dict, list[BadRecord], RawRecord], dict]] = {
    "native": _native, "counterfact": _counterfact, "zsre": _zsre}


# -- native fields -> Fact ----------------------------------------------------------------------------------------

def _fact(rec: RawRecord, to_fields, provenance: Provenance, bad: list[BadRecord]) -> Fact | None:
    if not isinstance(rec.value, dict):
        bad.append(BadRecord(rec.number, rec.line, None, f"a fact must be an object with fields, not "
                             f"{_kind(rec.value)}"))
        return None
    n0 = len(bad)
    fields = to_fields(rec.value, bad, rec)
    names = getattr(fields, "names", {})

    def report(field: str, reason: str) -> None:
        bad.append(BadRecord(rec.number, rec.line, names.get(field, field), reason))

    subject = _text(fields.get("subject"), "subject", report, required=True)
    prompt = _text(fields.get("prompt"), "prompt", report, required=True)
    target = _text(fields.get("target"), "target", report, required=True)
    template = None
    if subject and prompt:
        if SLOT in prompt:
            if prompt.count(SLOT) > 1:
                report("prompt", "a template may hold '{}' (the subject's place) only once")
            else:
                template = prompt
        elif subject in prompt:
            template = prompt.replace(subject, SLOT, 1)
        else:
            report("prompt", f"does not contain the subject {_short(subject)} (write the subject into the "
                             "prompt verbatim, or use '{}' where it goes)")
    paraphrases = tuple(_texts(fields.get("paraphrases"), "paraphrases", report))
    locality = tuple(_probes(fields.get("locality"), report))
    if len(bad) > n0 or template is None or target is None:
        return None
    return Fact(subject, template, target, paraphrases, locality, provenance)


def _text(value: Any, field: str, report, required: bool = False) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            report(field, "is missing" if value is None else "is empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        report(field, f"must be text, not {_kind(value)}" + (" (quote it)" if isinstance(value, (bool, float))
                                                               else ""))
        return None
    value = str(value).strip()
    if "\x00" in value:
        report(field, "contains a NUL character")
        return None
    if len(value) > MAX_FIELD_CHARS:
        report(field, f"is {len(value)} characters long; the limit is {MAX_FIELD_CHARS}")
        return None
    return value


def _texts(value: Any, field: str, report) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        report(field, f"must be a list of texts, not {_kind(value)}")
        return []
    out = []
    for i, item in enumerate(items):
        text = _text(item, f"{field}[{i}]", report, required=True)
        if text is not None:
            out.append(text)
    return out


def _probes(value: Any, report) -> list[LocalityProbe]:
    if value is None:
        return []
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        report("locality", f"must be a list of prompts or {{prompt, target}} objects, not {_kind(value)}")
        return []
    out = []
    for i, item in enumerate(items):
        field = f"locality[{i}]"
        if isinstance(item, dict):
            extra = set(item) - {"prompt", "target"}
            if extra:
                report(field, f"unknown keys {sorted(map(str, extra))}; a probe has 'prompt' and optional 'target'")
                continue
            prompt = _text(item.get("prompt"), f"{field}.prompt", report, required=True)
            target = _text(item.get("target"), f"{field}.target", report)
            if prompt is not None:
                out.append(LocalityProbe(prompt, target))
        else:
            prompt = _text(item, field, report, required=True)
            if prompt is not None:
                out.append(LocalityProbe(prompt))
    return out


def _position(p: BadRecord) -> tuple[int, int]:
    return (p.record if p.record is not None else 0, p.line if p.line is not None else 0)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")
