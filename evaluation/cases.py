"""COUNTERFACT and zsRE records -> ``Case``s, read through kb's own dialects (kb/validation.py).

A benchmark reads a dataset record by record: the files repeat a (subject, prompt) with another target now
and then, which a fact file may not, so each record is validated alone. Beyond what a fact holds, a case needs
the true answer (COUNTERFACT ``ground_truth``; zsRE ``answers[0]``, else ``pred``), one paraphrase and one
locality probe with its answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from editor.errors import EditorError
from editor.metrics import Case
from kb.errors import InvalidFactsError
from kb.validation import validate_record

DATASETS = ("counterfact", "zsre")


def load_cases(dataset: str, path: str | Path, span: tuple[int, int]) -> list[Case]:
    """Cases ``span`` = (a, b) (0-based, b excluded) of a COUNTERFACT or zsRE file in the formats of
    ``shared/data``."""
    if dataset not in DATASETS:
        raise EditorError(f"unknown dataset {dataset!r}: use counterfact or zsre")
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EditorError(f"dataset file {path} not found; pass --data PATH (COUNTERFACT or zsRE JSON)") from None
    except json.JSONDecodeError as exc:
        raise EditorError(f"dataset file {path} is not JSON: {exc}") from None
    a, b = span
    if not isinstance(records, list) or not 0 <= a < b <= len(records):
        size = f"the {len(records)} records" if isinstance(records, list) else "the records (it holds no list)"
        raise EditorError(f"cases {a}:{b} are outside {size} of {path}")
    return [_case(dataset, r, i, path) for i, r in enumerate(records[a:b], start=a)]


def _case(dataset: str, record, i: int, path) -> Case:
    def bad(reasons: str, hint: bool = True) -> EditorError:
        return EditorError(f"case {i} of {path} is not a usable {dataset} record: {reasons}"
                           + (f"; is it a {dataset} file?" if hint else "; choose a range without it"))

    try:
        fact = validate_record(record, dataset, str(path), i)
    except InvalidFactsError as e:
        raise bad("; ".join(f"field '{p.field}' {p.reason}" if p.field else p.reason for p in e.problems),
                  hint=any(p.reason == "is missing" for p in e.problems)) from None
    true = record.get("ground_truth") if dataset == "counterfact" else (record.get("answers") or [record.get("pred")])[0]
    missing = [name for name, ok in (("the true answer", isinstance(true, str) and true.strip()),
                                     ("a paraphrase", fact.paraphrases),
                                     ("a locality probe with its answer", fact.locality and fact.locality[0].target))
               if not ok]
    if missing:
        raise bad("it has no " + ", no ".join(missing), hint=False)
    case_id = int(record.get("case_id", i)) if dataset == "counterfact" else i
    loc = fact.locality[0]
    return Case(case_id, fact.subject, fact.prompt, fact.target, true.strip(), fact.paraphrases[0], loc.prompt, loc.target)


def first_contesting(scored: list[Case], edits: list[Case]) -> list[int | None]:
    """Per case of ``scored``: the index in ``edits`` of the first edit that contests its locality probe, or
    None. An edit contests the probe when the probe's prompt names the edit's subject and the probe's answer
    is the edit's true answer: the probe then asks the very fact the edit changed ("Keith Olbermann, who is
    employed by" -> ESPN, after an edit "Keith Olbermann, who works for" -> BBC), which a correct editor must
    move. COUNTERFACT draws a case's locality prompt from other subjects, and past a few thousand edits some
    of those subjects are edited too. Subjects of three characters or fewer are skipped (they match inside
    other words)."""
    first: dict[tuple[str, str], int] = {}
    for j, e in enumerate(edits):
        if len(e.subject) > 3:
            first.setdefault((e.subject, e.target_true.strip()), j)
    out = []
    for c in scored:
        hits = [j for (subject, true), j in first.items() if true == c.loc_answer.strip() and subject in c.loc_prompt]
        out.append(min(hits) if hits else None)
    return out
