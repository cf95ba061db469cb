"""Fact-file formats: bytes -> text (BOMs, UTF-8/16/32) -> raw records (JSON, JSONL, CSV, YAML).

This layer only splits a file into records and says where each came from; what a record must contain is
``kb.validation``'s business. Every syntax problem is reported, with its line, as a ``BadRecord``.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import yaml

from .records import BadRecord

FORMATS = ("json", "jsonl", "csv", "yaml")
EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".yaml": "yaml",
              ".yml": "yaml"}
#: CSV columns whose cells may hold a JSON list (``["a", "b"]``); any other text is one item.
LIST_COLUMNS = frozenset({"paraphrases", "locality", "rephrase_prompt", "locality_prompt", "locality_ground_truth"})
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass(frozen=True)
class RawRecord:
    """One record as parsed, before validation: its 1-based number, its line when known, its value."""

    number: int
    line: int | None
    value: Any


class FormatError(Exception):
    """Raised inside this module with every problem found; ``kb.validation`` turns it into a report."""

    def __init__(self, problems: list[BadRecord]):
        super().__init__("; ".join(p.describe() for p in problems))
        self.problems = problems


def read_records(data: bytes, name: str, fmt: str | None = None) -> tuple[list[RawRecord], list[BadRecord]]:
    """Split a fact file's bytes into raw records, and the records that could not be read (JSONL, CSV).

    ``fmt`` overrides the format the extension implies. Raises ``FormatError`` when no record can be read.
    """
    text = decode(data)
    if not text.strip():
        raise FormatError([BadRecord(None, None, None, "the file is empty: it holds no facts")])
    fmt = fmt or detect_format(name, text)
    if fmt not in FORMATS:
        raise FormatError([BadRecord(None, None, None, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")])
    return {"json": _json, "jsonl": _jsonl, "csv": _csv, "yaml": _yaml}[fmt](text)


def decode(data: bytes) -> str:
    """Bytes to text: a UTF-8/16/32 byte-order mark picks the codec (and is dropped); otherwise UTF-8."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            break
    else:
        codec = "utf-8"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1 if codec == "utf-8" else None
        raise FormatError([BadRecord(None, line, None, f"not valid {codec.upper()} text at byte {e.start} "
                                     "(save the file as UTF-8)")]) from None
    return text.lstrip("\ufeff")


def detect_format(name: str, text: str) -> str:
    """The format from the file extension; for other names, JSON or JSONL by content."""
    fmt = EXTENSIONS.get(PurePath(name).suffix.lower())
    if fmt:
        return fmt
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        try:
            json.loads(text)
            return "json"
        except (ValueError, RecursionError):
            return "jsonl"
    raise FormatError([BadRecord(None, None, None, f"cannot tell the format of {name!r}: name it "
                                 f"{', '.join(sorted(EXTENSIONS))}")])


def _listing(doc: Any, line_of: dict[int, int] | None = None) -> tuple[list[RawRecord], list[BadRecord]]:
    """A JSON/YAML document holding a list of records, or an object with a ``facts`` list."""
    if isinstance(doc, dict) and "facts" in doc:
        doc = doc["facts"]
    if not isinstance(doc, list):
        kind = type(doc).__name__ if doc is not None else "nothing"
        raise FormatError([BadRecord(None, None, None, f"the top level must be a list of facts or an object "
                                     f"with a 'facts' list, not {kind}")])
    return [RawRecord(i + 1, (line_of or {}).get(i), v) for i, v in enumerate(doc)], []


def _json(text: str) -> tuple[list[RawRecord], list[BadRecord]]:
    try:
        doc = json.loads(text)
    except RecursionError:
        raise FormatError([BadRecord(None, None, None, "invalid JSON: nested too deeply")]) from None
    except ValueError as e:
        hint = " (one JSON object per line? name the file .jsonl)" if "Extra data" in str(e) else ""
        line = getattr(e, "lineno", None)
        raise FormatError([BadRecord(None, line, None, f"invalid JSON: {getattr(e, 'msg', e)}{hint}")]) from None
    return _listing(doc)


def _jsonl(text: str) -> tuple[list[RawRecord], list[BadRecord]]:
    records, problems = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        number = len(records) + len(problems) + 1
        try:
            records.append(RawRecord(number, lineno, json.loads(line)))
        except RecursionError:
            problems.append(BadRecord(number, lineno, None, "invalid JSON: nested too deeply"))
        except ValueError as e:
            problems.append(BadRecord(number, lineno, None,
                                      f"invalid JSON: {getattr(e, 'msg', e)} (column {getattr(e, 'colno', '?')})"))
    return records, problems


def _csv(text: str) -> tuple[list[RawRecord], list[BadRecord]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records, problems = [], []
    try:
        header = next((row for row in reader if any(c.strip() for c in row)), [])
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or not all(header) or not header:
            raise FormatError([BadRecord(None, reader.line_num, None,
                                         f"the CSV header {header} has empty or repeated columns")])
        line = reader.line_num + 1
        for row in reader:
            if not any(cell.strip() for cell in row):
                line = reader.line_num + 1
                continue
            number = len(records) + len(problems) + 1
            if len(row) > len(header):
                problems.append(BadRecord(number, line, None, f"the row has {len(row)} cells but the header "
                                          f"has {len(header)} columns (quote cells that contain commas)"))
            else:
                records.append(RawRecord(number, line, {h: _cell(h, c) for h, c in zip(header, row) if c != ""}))
            line = reader.line_num + 1
    except csv.Error as e:
        problems.append(BadRecord(None, reader.line_num, None, f"invalid CSV: {e}"))
    return records, problems


def _cell(column: str, cell: str) -> Any:
    if column in LIST_COLUMNS and cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except (ValueError, RecursionError):
            return cell
        return value if isinstance(value, list) else cell
    return cell


def _yaml(text: str) -> tuple[list[RawRecord], list[BadRecord]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FormatError([BadRecord(None, line, None, f"invalid YAML: {problem}")]) from None
    except RecursionError:
        raise FormatError([BadRecord(None, None, None, "invalid YAML: nested too deeply")]) from None
    if isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if getattr(k, "value", None) == "facts"), node)
    lines = {i: n.start_mark.line + 1 for i, n in enumerate(node.value)} if isinstance(node, yaml.SequenceNode) else {}
    return _listing(doc, lines)
