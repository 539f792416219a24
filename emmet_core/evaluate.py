"""Score evaluation records on the model as it is now (before or after an edit).

All prompts of all records go through :func:`readout.score_targets` in shared batches;
the metrics themselves are the pure functions of :mod:`metrics`.
"""

from __future__ import annotations

from statistics import fmean

from . import metrics
from .data import EvalRecord
from .models import LoadedModel
from .readout import generate, score_targets

METRICS = ("ES", "PS", "NS", "EM", "PM", "NM", "GE", "S")
# Per CounterFact record: the mean margin of the rewrite, paraphrase and neighbour
# prompts, in nats (see :func:`_counterfact`).
MARGINS = ("ES_margin", "PS_margin", "NS_margin")


def _groups(record: EvalRecord) -> list[tuple[str, list[str], str, list[str]]]:
    """(group, prompts, new object, true object per prompt) of one record."""
    request = record.request
    true = request.target_true or ""
    return [
        ("rewrite", [request.text], request.target_new, [true]),
        ("paraphrase", record.paraphrase_prompts, request.target_new, [true] * len(record.paraphrase_prompts)),
        ("neighborhood", record.neighborhood_prompts, request.target_new, record.neighborhood_targets),
    ]


def score_records(
    loaded: LoadedModel,
    records: list[EvalRecord],
    kind: str = "counterfact",
    generation: bool | list[bool] = True,
    gen_tokens: int = 100,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, float]]:
    """Per-record metrics (fractions, not ×100). CounterFact: ES PS NS EM PM NM S and GE
    for the records ``generation`` selects (all, none, or one flag per record), and the
    :data:`MARGINS` of the same readings. zsRE:
    token accuracy on rewrite (ES), paraphrase (PS) and neighbourhood (NS, against the
    neighbourhood's own answer)."""
    prompts, new, true, where = [], [], [], []
    for index, record in enumerate(records):
        for group, group_prompts, target_new, group_true in _groups(record):
            for prompt, target_true in zip(group_prompts, group_true):
                prompts.append(prompt)
                new.append(target_new)
                true.append(target_true)
                where.append((index, group))
    new_scores = score_targets(loaded, prompts, new, batch_size)
    true_scores = score_targets(loaded, prompts, true, batch_size)
    collected: list[dict[str, tuple[list, list]]] = [{} for _ in records]
    for (index, group), a, b in zip(where, new_scores, true_scores):
        lists = collected[index].setdefault(group, ([], []))
        lists[0].append(a)
        lists[1].append(b)
    out = [_counterfact(c) if kind == "counterfact" else _zsre(c) for c in collected]
    flags = generation if isinstance(generation, list) else [generation] * len(records)
    chosen = [i for i, flag in enumerate(flags) if flag]
    if chosen and kind == "counterfact":
        texts = generation_texts(loaded, [records[i] for i in chosen], gen_tokens, seed)
        for i, record_texts in zip(chosen, texts):
            if record_texts:
                out[i]["GE"] = fmean(metrics.generation_entropy(t) for t in record_texts)
    return out


def _nll(scores: list) -> list[float]:
    return [s.mean_nll for s in scores]


def _counterfact(groups: dict[str, tuple[list, list]]) -> dict[str, float]:
    """ES/PS/NS, their magnitudes, and the mean margin of each (``ES_margin``…: mean
    per-token NLL of the losing object minus the winning one's, in nats, positive when
    the prompt goes the metric's way) so a win by a hair can be told from a clear one."""
    row: dict[str, float] = {}
    for group, (name, mag) in {"rewrite": ("ES", "EM"), "paraphrase": ("PS", "PM")}.items():
        if group in groups:
            new, true = map(_nll, groups[group])
            row[name], row[mag] = metrics.success(new, true), metrics.magnitude(new, true)
            row[f"{name}_margin"] = fmean(t - n for n, t in zip(new, true))
    if "neighborhood" in groups:
        new, true = map(_nll, groups["neighborhood"])
        row["NS"], row["NM"] = metrics.kept(new, true), -metrics.magnitude(new, true)
        row["NS_margin"] = fmean(n - t for n, t in zip(new, true))
    row["S"] = metrics.harmonic_mean(*(row[k] for k in ("ES", "PS", "NS") if k in row))
    return row


def _zsre(groups: dict[str, tuple[list, list]]) -> dict[str, float]:
    """Token accuracy: of the new object on rewrite and paraphrase, of the neighbourhood's
    own answer on the neighbourhood prompt (specificity)."""
    row = {"ES": fmean(s.hits / s.n_tokens for s in groups["rewrite"][0])}
    if "paraphrase" in groups:
        row["PS"] = fmean(s.hits / s.n_tokens for s in groups["paraphrase"][0])
    if "neighborhood" in groups:
        row["NS"] = fmean(s.hits / s.n_tokens for s in groups["neighborhood"][1])
    row["S"] = metrics.harmonic_mean(*(row[k] for k in ("ES", "PS", "NS") if k in row))
    return row


def generation_texts(loaded: LoadedModel, records: list[EvalRecord], gen_tokens: int = 100,
                     seed: int = 0) -> list[list[str]]:
    """Seeded top-5 continuations of each record's generation prompts (REFERENCE §7)."""
    prompts = [p for r in records for p in r.generation_prompts]
    texts = iter(generate(loaded, prompts, max_new_tokens=gen_tokens, batch_size=64, top_k=5, seed=seed))
    return [[next(texts) for _ in r.generation_prompts] for r in records]


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over records, ×100 for the score metrics as in the papers (GE stays in bits)."""
    summary = {}
    for name in METRICS:
        values = [r[name] for r in rows if name in r]
        if values:
            summary[name] = fmean(values) * (1 if name == "GE" else 100)
    if all(k in summary for k in ("ES", "PS", "NS")):
        summary["S"] = metrics.harmonic_mean(summary["ES"], summary["PS"], summary["NS"])
    return summary
