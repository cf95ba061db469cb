"""Is there a null space to project edits into? The eigen-spectrum of the key statistics E[k kᵀ] per layer.

    .venv/bin/python bench/key_spectrum.py            # 1 min; bench/out/key_spectrum.json

AlphaEdit projects each update onto the null space of the preserved keys' covariance, the directions
where E[k kᵀ] has (near-)zero eigenvalues. This reports, per edited layer of the default model (shipped
statistics): the eigenvalue range, how many directions lie below 1e-2 and 1e-3 of the largest, the share of
the trace in the top 1 % of directions, and the Mahalanobis length kᵀ E[k kᵀ]⁻¹ k of edited subjects' keys
(COUNTERFACT tuning cases 0-199, bare prompt, last subject token) against WikiText-2 tokens (first token of
each text left out: the attention sink). The dimension d_in is the expected length for typical text.
"""
from __future__ import annotations

import json

import torch

from common import DATA, ROOT, default_editable, projection_inputs


@torch.no_grad()
def inputs_at(em, rows: list[tuple[list[int], int | None]]) -> dict[int, torch.Tensor]:
    """Per layer, the inputs to the edited projection: at ``lookup`` for each row, or all tokens but the first."""
    out: dict[int, list[torch.Tensor]] = {l: [] for l in em.layers}
    with projection_inputs(em) as got:
        for ids, look in rows:
            em.model(input_ids=torch.tensor([ids]))
            for l in em.layers:
                out[l].append(got[l][0, look][None] if look is not None else got[l][0, 1:])
    return {l: torch.cat(v).double() for l, v in out.items()}


def main() -> None:
    from evaluation.cases import load_cases
    from evaluation.harness import heldout_texts
    from editor.hook import Mode
    from editor.requests import subject_row
    cfg, em, stats = default_editable(with_stats=True)
    cases = load_cases("counterfact", DATA / "counterfact-edit.json", (0, 200))
    subj_rows = []
    for c in cases:
        row = subject_row(em.tokenizer, c.request.text, c.subject, 0)
        subj_rows.append((row.ids, row.lookup))
    wiki_rows = [(em.tokenizer(t)["input_ids"][:256], None) for t in heldout_texts(DATA / "wikitext2-valid.txt")]
    with em.mode(Mode.OFF):
        subj, wiki = inputs_at(em, subj_rows), inputs_at(em, wiki_rows)
    report = {"stats": stats.key, "layers": {}}
    for l in em.layers:
        C = stats.for_layer(l).double()
        e = torch.linalg.eigvalsh(C)                                          # ascending
        d = e.numel()
        Ci = torch.linalg.inv(C)
        maha = lambda X: ((X @ Ci) * X).sum(1)                                # noqa: E731
        ms, mw = maha(subj[l]), maha(wiki[l])
        r = {"d_in": d, "eig_max": float(e[-1]), "eig_min": float(e[0]),
             "max_over_min": round(float(e[-1] / e[0]), 1),
             "dims_below_1e-2_max": int((e < 1e-2 * e[-1]).sum()),
             "dims_below_1e-3_max": int((e < 1e-3 * e[-1]).sum()),
             "trace_share_top_1pct": round(float(e[-max(1, d // 100):].sum() / e.sum()), 3),
             "maha_subject_median": round(float(ms.median()), 1),
             "maha_wiki_median": round(float(mw.median()), 1),
             "maha_wiki_p95": round(float(torch.quantile(mw, 0.95)), 1),
             "subject_over_wiki_p95": round(float((ms > torch.quantile(mw, 0.95)).float().mean()), 3)}
        report["layers"][l] = r
        print(l, json.dumps(r), flush=True)
    out = ROOT / "bench" / "out" / "key_spectrum.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
