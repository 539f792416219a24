"""What an edit did around it: its prompt, paraphrases, neighbours and generations, read
before and after on a session's model, plus the batch and comparison runs built on them.

The readers here only read the model; :mod:`workspace` decides whose weights they see.
Each one is called once before and once after the same edit, so the two readings are
directly comparable (same prompts, same objects, same sampling seed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..data import EvalRecord
from ..errors import EditError
from ..evaluate import score_records, summarise
from ..hparams import HParams
from ..models import LoadedModel
from ..readout import generate, greedy_answer, score_targets
from ..request import EditRequest
from .judge import CLEAR_MARGIN, Judgement, judge_kept, judge_new
from .workspace import EditRecord, PhaseCallback, Session, SharedModel


@dataclass(frozen=True)
class PromptScore:
    """One prompt read at one moment: how likely the new and the old object are."""

    prompt: str
    new: str
    true: str
    p_new: float
    p_true: float
    nll_new: float  # mean per-token NLL, what the CounterFact metrics compare
    nll_true: float

    @property
    def prefers_new(self) -> bool:
        return self.nll_new < self.nll_true

    def as_new(self, threshold: float = CLEAR_MARGIN) -> Judgement:
        """Judged as a rewrite or paraphrase prompt (should prefer the new object)."""
        return judge_new(self.nll_new, self.nll_true, self.new, self.true, threshold)

    def as_kept(self, threshold: float = CLEAR_MARGIN) -> Judgement:
        """Judged as a neighbour prompt (should keep its own object)."""
        return judge_kept(self.nll_new, self.nll_true, self.new, self.true, threshold)


def score_prompts(loaded: LoadedModel, prompts: list[str], new: list[str], true: list[str]) -> list[PromptScore]:
    """Score the new and the true object after each prompt."""
    if not prompts:
        return []
    scores_new, scores_true = score_targets(loaded, prompts, new), score_targets(loaded, prompts, true)
    return [PromptScore(p, n, t, a.prob, b.prob, a.mean_nll, b.mean_nll)
            for p, n, t, a, b in zip(prompts, new, true, scores_new, scores_true)]


@dataclass
class Reading:
    """Everything read from the model at one moment for one fact."""

    rewrite: PromptScore
    paraphrases: list[PromptScore]
    neighbours: list[PromptScore]
    texts: list[str]  # sampled continuations of :attr:`FactChecks.generation_prompts`
    entropy: list[float]  # generation entropy of each text (REFERENCE §7, GE)


@dataclass
class FactChecks:
    """The prompts one edit is judged on. A neighbour given without its object gets the
    model's own answer at the first reading (before the edit), kept for the second."""

    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[tuple[str, str | None]] = field(default_factory=list)
    texts: int = 2  # continuations generated: the prompt and the first paraphrases
    gen_tokens: int = 40
    seed: int = 0

    def generation_prompts(self, request: EditRequest) -> list[str]:
        return [request.text, *self.paraphrases][: self.texts]

    def read(self, loaded: LoadedModel, requests: list[EditRequest]) -> Reading:
        (request,) = requests
        missing = [i for i, (_, target) in enumerate(self.neighbours) if not target]
        if missing:
            answers = greedy_answer(loaded, [self.neighbours[i][0] for i in missing])
            for i, answer in zip(missing, answers):
                self.neighbours[i] = (self.neighbours[i][0], answer or "?")
        new, true = request.target_new, request.target_true or ""
        rewrite = score_prompts(loaded, [request.text], [new], [true])[0]
        count = len(self.paraphrases)
        paraphrases = score_prompts(loaded, self.paraphrases, [new] * count, [true] * count)
        hood_prompts = [p for p, _ in self.neighbours]
        neighbours = score_prompts(loaded, hood_prompts, [new] * len(hood_prompts),
                                   [t or "" for _, t in self.neighbours])
        texts: list[str] = []
        if self.texts and self.gen_tokens:
            texts = generate(loaded, self.generation_prompts(request), self.gen_tokens, top_k=5, seed=self.seed)
        return Reading(rewrite, paraphrases, neighbours, texts, [metrics.generation_entropy(t) for t in texts])


@dataclass
class EditReport:
    """One fact edited on the Edit page: the record and the two readings."""

    request: EditRequest
    record: EditRecord
    before: Reading
    after: Reading
    generation_prompts: list[str]

    @property
    def paraphrases_passed(self) -> int:
        return sum(p.as_new().passed for p in self.after.paraphrases)

    @property
    def neighbours_kept(self) -> int:
        return sum(p.as_kept().passed for p in self.after.neighbours)

    @property
    def already_new(self) -> bool:
        """The model preferred the new object before the edit: the edit proves little."""
        return self.before.rewrite.as_new().passed

    def summary(self) -> dict[str, Any]:
        """The numbers kept in the session's edit log."""
        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        return {
            "prompt": self.request.text, "target_new": self.request.target_new,
            "target_true": self.request.target_true,
            "p_new": [self.before.rewrite.p_new, self.after.rewrite.p_new],
            "p_true": [self.before.rewrite.p_true, self.after.rewrite.p_true],
            "paraphrases_passed": [self.paraphrases_passed, len(self.after.paraphrases)],
            "neighbours_kept": [self.neighbours_kept, len(self.after.neighbours)],
            "generation_entropy": [mean(self.before.entropy), mean(self.after.entropy)],
        }


def edit_fact(session: Session, request: EditRequest, checks: FactChecks, algorithm: str,
              hparams: HParams | None = None, on_phase: PhaseCallback | None = None,
              on_wait: Callable[[], None] | None = None, cache_values: bool = False) -> EditReport:
    """Apply one fact to the session and read what changed around it. ``cache_values``:
    v* from the disk cache when the session's weights are the original ones (lecture
    mode, after the examples were prepared); the record says whether it was used."""
    outcome = session.edit([request], algorithm, hparams=hparams, before=checks.read, after=checks.read,
                           on_phase=on_phase, on_wait=on_wait, cache_values=cache_values)
    prepared = outcome.record.requests[0]
    report = EditReport(prepared, outcome.record, outcome.before, outcome.after,
                        checks.generation_prompts(prepared))
    outcome.record.summary = report.summary()
    return report


def parse_lines(text: str) -> list[str]:
    """Non-empty lines of a text box (one paraphrase per line)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_neighbours(text: str) -> list[tuple[str, str | None]]:
    """Lines ``prompt | object``; without an object the model's own answer is used."""
    out: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        prompt, _, target = line.partition("|")
        if prompt.strip():
            out.append((prompt.strip(), target.strip() or None))
    return out


def format_neighbours(neighbours: Sequence[tuple[str, str | None]]) -> str:
    return "\n".join(f"{p} | {t}" if t else p for p, t in neighbours)


# -- records: batch runs and comparisons ---------------------------------------------------
def record_for(request: EditRequest, paraphrases: Sequence[str], neighbours: Sequence[tuple[str, str | None]],
               case_id: int | str = 0) -> EvalRecord:
    """An evaluation record for a fact typed in the app."""
    return EvalRecord(case_id, request, list(paraphrases), [p for p, _ in neighbours],
                      [t or "" for _, t in neighbours], [request.text, *paraphrases][:2])


def resolve(loaded: LoadedModel, records: list[EvalRecord], prepared: list[EditRequest]) -> list[EvalRecord]:
    """Records with the checked requests (old objects filled in) and every neighbour
    without an object given the model's own answer."""
    out = [dataclasses.replace(r, request=p, neighborhood_targets=list(r.neighborhood_targets))
           for r, p in zip(records, prepared)]
    missing = [(i, j) for i, r in enumerate(out) for j, t in enumerate(r.neighborhood_targets) if not t]
    if missing:
        answers = greedy_answer(loaded, [out[i].neighborhood_prompts[j] for i, j in missing])
        for (i, j), answer in zip(missing, answers):
            out[i].neighborhood_targets[j] = answer or "?"
    return out


def _score(loaded: LoadedModel, records: list[EvalRecord], gen_tokens: int) -> list[dict[str, float]]:
    return score_records(loaded, records, generation=gen_tokens > 0, gen_tokens=max(gen_tokens, 1))


def _rewrite_probes(loaded: LoadedModel, records: list[EvalRecord]) -> list[PromptScore]:
    requests = [r.request for r in records]
    return score_prompts(loaded, [r.text for r in requests], [r.target_new for r in requests],
                 [r.target_true or "" for r in requests])


@dataclass
class BatchReport:
    """A batch of facts applied to a session: per-record metrics before and after."""

    record: EditRecord
    records: list[EvalRecord]
    before: list[dict[str, float]]
    after: list[dict[str, float]]

    @property
    def summary_before(self) -> dict[str, float]:
        return summarise(self.before)

    @property
    def summary_after(self) -> dict[str, float]:
        return summarise(self.after)

    def rows(self) -> list[dict[str, Any]]:
        """One row per fact: what was asked and its metrics before/after (fractions)."""
        out = []
        for record, pre, post in zip(self.records, self.before, self.after):
            row: dict[str, Any] = {"case_id": record.case_id, "prompt": record.request.text,
                                   "target_true": record.request.target_true,
                                   "target_new": record.request.target_new}
            row.update({f"{k}_before": v for k, v in pre.items()})
            row.update({f"{k}_after": v for k, v in post.items()})
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"edit": self.record.to_dict(), "summary_before": self.summary_before,
                "summary_after": self.summary_after, "records": self.rows()}


def run_batch(session: Session, records: list[EvalRecord], algorithm: str, hparams: HParams | None = None,
              chunk_size: int | None = None, gen_tokens: int = 0, on_phase: PhaseCallback | None = None,
              on_chunk: Callable[[int, int], None] | None = None,
              on_wait: Callable[[], None] | None = None) -> BatchReport:
    """Apply ``records`` to the session (in chunks, all kept) and score them before and after."""
    if not records:
        raise EditError("no facts to edit")
    resolved: list[list[EvalRecord]] = []

    def before(loaded: LoadedModel, prepared: list[EditRequest]) -> list[dict[str, float]]:
        resolved.append(resolve(loaded, records, prepared))
        return _score(loaded, resolved[0], gen_tokens)

    outcome = session.edit([r.request for r in records], algorithm, hparams=hparams, refuse_current=False,
                           chunk_size=chunk_size, before=before,
                           after=lambda loaded, _: _score(loaded, resolved[0], gen_tokens),
                           label=f"{algorithm.upper()} batch of {len(records)} facts",
                           on_phase=on_phase, on_chunk=on_chunk, on_wait=on_wait)
    report = BatchReport(outcome.record, resolved[0], outcome.before, outcome.after)
    outcome.record.summary = {"summary_before": report.summary_before, "summary_after": report.summary_after}
    return report


@dataclass
class CompareRow:
    """One algorithm (or the unedited model) on the compared facts."""

    algorithm: str
    metrics: dict[str, float] = field(default_factory=dict)  # ES PS NS EM PM NM GE S (×100, GE in bits)
    p_new: list[float] = field(default_factory=list)  # per fact, on its prompt
    p_true: list[float] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def delta_norm(self) -> float:
        """‖Δ‖ over all edited matrices together."""
        return math.sqrt(sum(v * v for v in self.norms.values()))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "delta_norm": self.delta_norm}


def compare(shared: SharedModel, records: list[EvalRecord], algorithms: Sequence[str],
            hparams: dict[str, HParams] | None = None, gen_tokens: int = 0,
            on_step: Callable[[str], None] | None = None,
            on_phase: PhaseCallback | None = None) -> list[CompareRow]:
    """The same facts through each algorithm, every time from the original weights (a
    fresh session), never kept. An algorithm that refuses (e.g. several layers where
    the family allows one) gets its error in its row; the others still run."""
    if not records:
        raise EditError("no facts to compare")
    step = on_step or (lambda name: None)
    base = Session(shared)
    step("unedited")

    def read_unedited(loaded: LoadedModel) -> tuple[list[EvalRecord], list[dict[str, float]], list[PromptScore]]:
        prepared = shared.editor.prepare([r.request for r in records])
        resolved = resolve(loaded, records, prepared)
        return resolved, _score(loaded, resolved, gen_tokens), _rewrite_probes(loaded, resolved)

    resolved, rows_before, probes = base.run(read_unedited)
    out = [CompareRow("unedited", summarise(rows_before), [p.p_new for p in probes], [p.p_true for p in probes])]
    for algorithm in algorithms:
        step(algorithm)
        row = CompareRow(algorithm)
        try:
            outcome = Session(shared).edit(
                [r.request for r in resolved], algorithm, hparams=(hparams or {}).get(algorithm),
                refuse_current=False, keep=False, on_phase=on_phase,
                after=lambda loaded, _: (_score(loaded, resolved, gen_tokens), _rewrite_probes(loaded, resolved)))
        except EditError as exc:
            row.error = str(exc)
            out.append(row)
            continue
        rows_after, probes = outcome.after
        record = outcome.record
        row.metrics, row.norms, row.seconds = summarise(rows_after), record.norms, record.seconds
        row.layers = record.layers
        row.p_new, row.p_true = [p.p_new for p in probes], [p.p_true for p in probes]
        out.append(row)
    return out
