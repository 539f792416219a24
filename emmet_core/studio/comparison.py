"""The Compare page as a research tool: the editors on the same facts, repeated with
different seeds, kept per fact, summarised as mean ± standard deviation across repeats,
and written out (CSV and JSON) with what produced them.

:func:`workflows.compare` runs one repeat; this module repeats it, flattens the rows and
formats them. No Streamlit here: the page only shows what these functions return.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import fmean, stdev
from typing import Any

from ..data import EvalRecord
from ..errors import InvalidRequestError
from ..evaluate import MARGINS, METRICS
from ..hparams import EDITOR_NAMES, HParams
from ..provenance import versions
from .judge import CLEAR_MARGIN, judge
from .workflows import CompareRow, compare
from .workspace import PhaseCallback, SharedModel

MAX_REPEATS = 5
UNEDITED = "unedited"
MISSING = "–"  # shown for a number that does not exist (the unedited model's ‖Δ‖, GE without texts)
# What the summary spreads over repeats: the means of one repeat, per editor.
SUMMARY_KEYS = (*METRICS, *MARGINS, "p_new", "p_true", "delta_norm", "seconds")
CSV_COLUMNS = ("row", "model", "editor", "repeat", "seed", "case_id", "subject", "prompt", "target_new",
               "target_true", *METRICS, *MARGINS, "judgement", "p_new", "p_true", "delta_norm", "seconds",
               "layers", "norms", "error", "hparams")


def editor_label(algorithm: str) -> str:
    return EDITOR_NAMES.get(algorithm, algorithm)


@dataclass
class CompareRun:
    """Every repeat of a comparison: ``repeats[r]`` holds the rows of seed ``seeds[r]``,
    the unedited model first, then one row per editor in the order asked."""

    model: str
    algorithms: list[str]
    seeds: list[int]
    repeats: list[list[CompareRow]]
    gen_tokens: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # where the facts came from
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def editors(self) -> list[str]:
        return [UNEDITED, *self.algorithms]

    @property
    def facts(self) -> int:
        return len(self.repeats[0][0].per_fact) if self.repeats else 0

    def rows_of(self, editor: str) -> list[CompareRow]:
        """The editor's row in each repeat."""
        return [row for rows in self.repeats for row in rows if row.algorithm == editor]

    def fact_rows(self) -> list[dict[str, Any]]:
        """Every fact × editor × repeat, flat. An editor that did not run has a row per
        fact all the same, with its error and no numbers."""
        out = []
        for repeat, (seed, rows) in enumerate(zip(self.seeds, self.repeats, strict=True), start=1):
            facts = rows[0].per_fact
            for row in rows:
                head = {"editor": row.algorithm, "repeat": repeat, "seed": seed}
                if row.error is not None:
                    out += [{**head, **_identity(fact), "error": row.error} for fact in facts]
                else:
                    out += [{**head, **fact} for fact in row.per_fact]
        return out

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per editor and number: mean, sample standard deviation and count over the
        repeats where the editor ran (each repeat contributes its mean over the facts)."""
        out = {}
        for editor in self.editors:
            seen = [run_values(row) for row in self.rows_of(editor)]
            out[editor] = {key: spread([s[key] for s in seen if key in s])
                           for key in SUMMARY_KEYS if any(key in s for s in seen)}
        return out

    def layer_norms(self, editor: str) -> dict[int, float]:
        """‖Δ‖ of each edited layer, averaged over the repeats where the editor ran."""
        rows = [row for row in self.rows_of(editor) if row.error is None and row.norms]
        layers = sorted({layer for row in rows for layer in row.norms})
        return {layer: fmean(row.norms[layer] for row in rows if layer in row.norms) for layer in layers}

    def mean_rows(self) -> list[CompareRow]:
        """One row per editor with its numbers averaged over the repeats where it ran (a
        row that never ran keeps its error): what the bar charts show."""
        out = []
        for editor in self.editors:
            rows = self.rows_of(editor)
            ok = [row for row in rows if row.error is None]
            if not ok:
                out.append(rows[0])
                continue
            keys = dict.fromkeys(key for row in ok for key in row.metrics)
            metrics = {key: fmean(row.metrics[key] for row in ok if key in row.metrics) for key in keys}
            p_new = [fmean(v) for v in zip(*(row.p_new for row in ok))]  # per fact
            p_true = [fmean(v) for v in zip(*(row.p_true for row in ok))]
            seconds = {"total": fmean(row.seconds.get("total", 0.0) for row in ok)}
            out.append(CompareRow(editor, metrics, p_new, p_true, self.layer_norms(editor), seconds, ok[0].layers))
        return out

    def errors(self, editor: str) -> list[str]:
        return list(dict.fromkeys(row.error for row in self.rows_of(editor) if row.error is not None))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "editors": self.algorithms, "seeds": self.seeds,
                "gen_tokens": self.gen_tokens, "facts": {**self.source, "count": self.facts},
                "versions": self.versions, "summary": self.summary(),
                "runs": [{"repeat": r, "seed": seed, "rows": [row.to_dict() for row in rows]}
                         for r, (seed, rows) in enumerate(zip(self.seeds, self.repeats, strict=True), start=1)]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_csv(self) -> str:
        """One ``fact`` row per fact × editor × repeat, then one ``mean`` row per editor ×
        repeat with its ‖Δ‖ per layer, time and hyper-parameters."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({"row": "fact", "model": self.model, **row} for row in self.fact_rows())
        for repeat, (seed, rows) in enumerate(zip(self.seeds, self.repeats, strict=True), start=1):
            writer.writerows({"row": "mean", "model": self.model, "editor": row.algorithm, "repeat": repeat,
                              "seed": seed, **_mean_row(row)} for row in rows)
        return buffer.getvalue()


def _identity(fact: dict[str, Any]) -> dict[str, Any]:
    return {k: fact.get(k) for k in ("case_id", "subject", "prompt", "target_new", "target_true")}


def _mean_row(row: CompareRow) -> dict[str, Any]:
    out: dict[str, Any] = {**run_values(row), "error": row.error}
    if row.algorithm != UNEDITED:
        out.update(layers=" ".join(map(str, row.layers)), norms=json.dumps(row.norms),
                   hparams=json.dumps(row.hparams) if row.hparams else None)
    return out


def run_values(row: CompareRow) -> dict[str, float]:
    """The numbers of one editor in one repeat that the summary spreads over repeats."""
    if row.error is not None:
        return {}
    out = {**row.metrics, **row.mean_margins}
    if row.p_new:
        out.update(p_new=fmean(row.p_new), p_true=fmean(row.p_true))
    if row.algorithm != UNEDITED:
        out.update(delta_norm=row.delta_norm, seconds=row.seconds.get("total", 0.0))
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for a single value: no spread to show)."""
    return {"mean": fmean(values), "std": stdev(values) if len(values) > 1 else None, "n": len(values)}


def check(records: Sequence[EvalRecord] | None, algorithms: Sequence[str], repeats: int) -> None:
    """Refuse, before any model work, a comparison of nothing or an impossible repeat count."""
    if not records:
        raise InvalidRequestError("choose at least one fact")
    if not algorithms:
        raise InvalidRequestError("choose at least one editor")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise InvalidRequestError(f"repeats must be a whole number from 1 to {MAX_REPEATS}, not {repeats!r}")


def compare_repeats(shared: SharedModel, records: list[EvalRecord], algorithms: Sequence[str], repeats: int = 1,
                    seed: int = 0, gen_tokens: int = 0, hparams: dict[str, HParams] | None = None,
                    source: dict[str, Any] | None = None, on_step: Callable[[str], None] | None = None,
                    on_phase: PhaseCallback | None = None) -> CompareRun:
    """:func:`compare` ``repeats`` times on the same facts, repeat r (from 0) with seed
    ``seed + r`` for everything random (context templates, sampled texts), so the spread
    across repeats shows how much a result depends on the seed."""
    check(records, algorithms, repeats)
    algorithms = list(dict.fromkeys(algorithms))
    seeds = [seed + r for r in range(repeats)]
    runs = [compare(shared, records, algorithms, hparams, gen_tokens, s, on_step, on_phase) for s in seeds]
    return CompareRun(shared.loaded.name, algorithms, seeds, runs, gen_tokens, dict(source or {}), versions())


# -- what the page shows ---------------------------------------------------------------------
FORMATS = {**{m: ".1f" for m in ("ES", "PS", "NS", "S")}, "GE": ".2f", **{m: ".1f" for m in ("EM", "PM", "NM")},
           **{m: "+.2f" for m in MARGINS}, "p_new": ".1%", "p_true": ".1%", "delta_norm": ".3g", "seconds": ".1f"}
HEADERS = {"ES_margin": "margin", "PS_margin": "paraphrase margin",
           "NS_margin": "neighbour margin", "p_new": "P(new)", "p_true": "P(old)", "delta_norm": "‖Δ‖"}


def number(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def mean_std(stats: dict[str, Any] | None, fmt: str) -> str:
    """``83.3 ± 4.1`` (one repeat: ``83.3``; nothing: ``–``)."""
    if not stats:
        return MISSING
    text = format(stats["mean"], fmt)
    return text if stats["std"] is None else f"{text} ± {format(stats['std'], fmt.lstrip('+'))}"


def summary_table(run: CompareRun) -> list[dict[str, str]]:
    """One row per editor: every number as mean ± std across repeats, text throughout
    so that a missing number reads ``–``."""
    out = []
    summary = run.summary()
    for editor in run.editors:
        stats = summary[editor]
        layers = run.layer_norms(editor)
        row = {"editor": editor_label(editor), "layers": ", ".join(map(str, layers)) or MISSING}
        row.update({HEADERS.get(key, key): mean_std(stats.get(key), fmt) for key, fmt in FORMATS.items()})
        row["‖Δ‖ by layer"] = " · ".join(f"{layer}: {norm:.3g}" for layer, norm in layers.items()) or MISSING
        row["note"] = "; ".join(run.errors(editor))
        out.append(row)
    return out


def fact_table(run: CompareRun, threshold: float = CLEAR_MARGIN) -> list[dict[str, str]]:
    """Every fact × editor × repeat as text: the rewrite prompt's judgement with its
    margin (``✓ +2.31``, ``✓? +0.40``, ``✗ -1.20``) against ``threshold``, the other
    margins and the scores."""
    out = []
    for fact in run.fact_rows():
        row = {"editor": editor_label(fact["editor"]), "repeat": str(fact["repeat"]), "seed": str(fact["seed"]),
               "case": str(fact.get("case_id")), "prompt": fact.get("prompt") or "",
               "new": fact.get("target_new") or "", "old": fact.get("target_true") or MISSING}
        margin = fact.get("ES_margin")
        # judge() takes the two NLLs; their difference is all it reads, so 0 and the margin do.
        row["rewrite"] = MISSING if margin is None else judge(
            0.0, margin, threshold=threshold, tie=fact.get("judgement") == "tie").label()
        row.update({HEADERS[m]: number(fact.get(m), FORMATS[m]) for m in MARGINS[1:]})
        row.update({m: number(fact.get(m), FORMATS[m]) for m in ("ES", "PS", "NS", "GE")})
        row["note"] = fact.get("error") or ""
        out.append(row)
    return out


@dataclass
class Tracker:
    """Where a running comparison is, for the progress text: the repeat (a new one starts
    at each unedited reading), the editor, its phase and, for ROME, which fact (it edits
    one after the other; the batch editors solve all facts at once)."""

    algorithms: list[str]
    repeats: int
    facts: int
    seed: int = 0
    repeat: int = 0
    current: str = ""
    phase: str = ""
    fact: int = 0

    def on_step(self, name: str) -> None:
        if name == UNEDITED:
            self.repeat += 1
        self.current, self.phase, self.fact = name, "", 0

    def on_phase(self, phase: str) -> None:
        phase = phase.partition(": ")[0]  # "values: step 3/25, …" is progress inside the values phase
        self.phase = phase
        if self.current == "rome" and phase == "keys":
            self.fact += 1

    @property
    def span(self) -> tuple[float, float]:
        """The share of the whole run before and after the current step."""
        steps = len(self.algorithms) + 1
        done = (self.repeat - 1) * steps + ([UNEDITED, *self.algorithms].index(self.current)
                                             if self.current else 0)
        total = steps * self.repeats
        return max(done, 0) / total, (max(done, 0) + 1) / total

    def text(self) -> str:
        where = f"Repeat {self.repeat} of {self.repeats} (seed {self.seed + self.repeat - 1})"
        facts = f"{self.facts} fact{'s' if self.facts != 1 else ''}"
        if self.current == UNEDITED:
            return f"{where} · **reading the unedited model** on {facts}"
        index = self.algorithms.index(self.current) + 1 if self.current in self.algorithms else 0
        what = f"{where} · **{editor_label(self.current)}** (editor {index} of {len(self.algorithms)})"
        if self.current != "rome":
            return f"{what} · all {facts} in one solve"
        if self.phase in ("keys", "values", "solve"):
            return f"{what} · fact {max(self.fact, 1)} of {self.facts}"
        return f"{what} · {facts}, one after the other"
