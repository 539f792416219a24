"""What an edit did around it: its prompt, paraphrases, neighbours and generations, read
before and after on a session's model, plus the batch and comparison runs built on them.

The readers here only read the model; :mod:`workspace` decides whose weights they see.
Each one is called once before and once after the same edit, so the two readings are
directly comparable (same prompts, same objects, same sampling seed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..data import EvalRecord
from ..errors import EditError, InvalidRequestError
from ..evaluate import MARGINS, score_records, summarise
from ..hparams import HParams
from ..models import LoadedModel
from ..readout import generate, greedy_answer, score_targets
from ..request import EditRequest, quote
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
    both = score_targets(loaded, [*prompts, *prompts], [*new, *true])  # one batch: new and true together
    scores_new, scores_true = both[: len(prompts)], both[len(prompts) :]
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
        """Probabilities on every prompt (fast: the answer to "did it work?"); the texts
        are generated afterwards by :func:`generate_texts`, outside the edit."""
        (request,) = requests
        missing = [i for i, (_, target) in enumerate(self.neighbours) if not target]
        if missing:
            answers = greedy_answer(loaded, [self.neighbours[i][0] for i in missing])
            for i, answer in zip(missing, answers):
                self.neighbours[i] = (self.neighbours[i][0], answer or "?")
        new, true = request.target_new, request.target_true or ""
        prompts = [request.text, *self.paraphrases, *(p for p, _ in self.neighbours)]
        trues = [true] * (1 + len(self.paraphrases)) + [t or "" for _, t in self.neighbours]
        scores = score_prompts(loaded, prompts, [new] * len(prompts), trues)  # one batch for every prompt
        count = 1 + len(self.paraphrases)
        return Reading(scores[0], scores[1:count], scores[count:], [], [])


@dataclass
class EditReport:
    """One fact edited on the Edit page: the record and the two readings."""

    request: EditRequest
    record: EditRecord
    before: Reading
    after: Reading
    generation_prompts: list[str]
    gen_tokens: int = 0
    seed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # reading: before, after, texts; "edit": the edit

    @property
    def texts_pending(self) -> bool:
        """Texts were asked for and are not generated yet."""
        return bool(self.gen_tokens and self.generation_prompts and not self.after.texts)

    @property
    def total_seconds(self) -> float:
        """What the user waited: reading before, the edit, reading after, the texts."""
        return sum(self.seconds.values())

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
    """Apply one fact to the session and read its probabilities before and after; the
    texts (``checks.gen_tokens``) are left to :func:`generate_texts`, so a page can show
    the answer first. ``cache_values``: v* from the disk cache when the session's
    weights are the original ones (lecture mode, after the examples were prepared); the
    record says whether it was used."""
    clock: dict[str, float] = {}

    def timed(name: str):
        def read(loaded: LoadedModel, requests: list[EditRequest]) -> Reading:
            started = time.perf_counter()
            try:
                return checks.read(loaded, requests)
            finally:
                clock[name] = time.perf_counter() - started
        return read

    outcome = session.edit([request], algorithm, hparams=hparams, before=timed("reading before"),
                           after=timed("reading after"), on_phase=on_phase, on_wait=on_wait,
                           cache_values=cache_values)
    prepared = outcome.record.requests[0]
    seconds = {"reading before": clock["reading before"], "edit": outcome.record.seconds.get("total", 0.0),
               "reading after": clock["reading after"]}
    report = EditReport(prepared, outcome.record, outcome.before, outcome.after,
                        checks.generation_prompts(prepared) if checks.texts else [],
                        checks.gen_tokens, checks.seed, seconds)
    outcome.record.summary = report.summary()
    return report


TextCallback = Callable[[str, list[str]], None]  # (before|after, the texts so far, one per prompt)


def generate_texts(session: Session, report: EditReport, on_text: TextCallback | None = None,
                   on_wait: Callable[[], None] | None = None) -> None:
    """Sample the report's texts on the session's weights just before and just after its
    edit (same seed), all prompts of a side in one batch (the model is released between
    the two sides, so other sessions are not held up for long), and fill in the texts
    and their generation entropy."""
    if not report.texts_pending:
        return
    started = time.perf_counter()
    texts: dict[str, list[str]] = {}
    for side, deltas in zip(("before", "after"), session.around(report.record)):
        def sample(loaded: LoadedModel, side: str = side) -> list[str]:
            stream = None if on_text is None else (lambda so_far: on_text(side, so_far))
            return generate(loaded, report.generation_prompts, report.gen_tokens, top_k=5, seed=report.seed,
                            on_texts=stream)
        texts[side] = session.run_on(deltas, sample, on_wait)
    for side, reading in (("before", report.before), ("after", report.after)):
        reading.texts = texts[side]
        reading.entropy = [metrics.generation_entropy(t) for t in texts[side]]
    report.seconds["texts"] = time.perf_counter() - started
    report.record.summary = report.summary()


# What one person may ask of the shared model from a page: enough for any real fact, far
# from a 5,000-character prompt that would hold the model for everyone.
MAX_PROMPT_CHARS = 300
MAX_OBJECT_CHARS = 80
MAX_CHECKS = 10  # paraphrases, and neighbours


def check_lengths(request: EditRequest, paraphrases: Sequence[str] = (),
                  neighbours: Sequence[tuple[str, str | None]] = ()) -> None:
    """Refuse over-long inputs with a short message (the text is never echoed whole)."""
    def refuse(what: str, text: str, limit: int) -> None:
        if len(text) > limit:
            raise InvalidRequestError(f"{what} is {len(text):,} characters long; at most {limit} here "
                                      f"({quote(text, 40)})")

    refuse("the prompt", request.text, MAX_PROMPT_CHARS)
    refuse("the new object", request.target_new, MAX_OBJECT_CHARS)
    refuse("the old object", request.target_true or "", MAX_OBJECT_CHARS)
    for kind, count in (("paraphrases", len(paraphrases)), ("neighbours", len(neighbours))):
        if count > MAX_CHECKS:
            raise InvalidRequestError(f"{count} {kind}; at most {MAX_CHECKS} per edit")
    for line in paraphrases:
        refuse("a paraphrase", line, MAX_PROMPT_CHARS)
    for prompt, target in neighbours:
        refuse("a neighbour prompt", prompt, MAX_PROMPT_CHARS)
        refuse("a neighbour's object", target or "", MAX_OBJECT_CHARS)


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


def _score(loaded: LoadedModel, records: list[EvalRecord], gen_tokens: int, seed: int = 0) -> list[dict[str, float]]:
    return score_records(loaded, records, generation=gen_tokens > 0, gen_tokens=max(gen_tokens, 1), seed=seed)


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
    """One algorithm (or the unedited model) on the compared facts, with one seed."""

    algorithm: str
    metrics: dict[str, float] = field(default_factory=dict)  # ES PS NS EM PM NM GE S (×100, GE in bits)
    p_new: list[float] = field(default_factory=list)  # per fact, on its prompt
    p_true: list[float] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    error: str | None = None
    per_fact: list[dict[str, Any]] = field(default_factory=list)  # :func:`fact_rows`, one per fact
    seed: int = 0  # of everything random: the context templates and the sampled texts
    hparams: dict[str, Any] = field(default_factory=dict)  # of the edit (empty for the unedited model)

    @property
    def delta_norm(self) -> float:
        """‖Δ‖ over all edited matrices together."""
        return math.sqrt(sum(v * v for v in self.norms.values()))

    @property
    def mean_margins(self) -> dict[str, float]:
        """Mean over the facts of each margin (nats) that some fact has."""
        out = {}
        for name in MARGINS:
            values = [f[name] for f in self.per_fact if f.get(name) is not None]
            if values:
                out[name] = sum(values) / len(values)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "delta_norm": self.delta_norm}


def fact_rows(records: list[EvalRecord], scores: list[dict[str, float]],
              probes: list[PromptScore]) -> list[dict[str, Any]]:
    """One row per fact: what was asked, its metrics in the units of the means (×100, GE
    in bits, so the means are their average), its margins (nats) and the rewrite
    prompt's judgement (:mod:`judge`)."""
    out = []
    for record, score, probe in zip(records, scores, probes, strict=True):
        request = record.request
        row: dict[str, Any] = {"case_id": record.case_id, "subject": request.subject, "prompt": request.text,
                               "target_new": request.target_new, "target_true": request.target_true}
        row.update(summarise([score]))
        row.update({name: score[name] for name in MARGINS if name in score})
        row.update(judgement=probe.as_new().outcome, p_new=probe.p_new, p_true=probe.p_true)
        out.append(row)
    return out


def compare(shared: SharedModel, records: list[EvalRecord], algorithms: Sequence[str],
            hparams: dict[str, HParams] | None = None, gen_tokens: int = 0, seed: int = 0,
            on_step: Callable[[str], None] | None = None,
            on_phase: PhaseCallback | None = None) -> list[CompareRow]:
    """The same facts through each algorithm, every time from the original weights (a
    fresh session), never kept. ``seed`` replaces the hyper-parameters' seed (context
    templates) and seeds the sampled texts. An algorithm that refuses (e.g. several
    layers where the family allows one) gets its error in its row; the others still
    run. A fact given with its old object is edited even if the model already prefers
    the new one (its unedited row shows it); one given without, whose greedy answer is
    already the new object, is refused for the whole comparison (it has no old object)."""
    if not records:
        raise EditError("no facts to compare")
    step = on_step or (lambda name: None)
    base = Session(shared)
    step("unedited")

    def read(loaded: LoadedModel, resolved: list[EvalRecord]) -> tuple[list[dict[str, float]], list[PromptScore]]:
        return _score(loaded, resolved, gen_tokens, seed), _rewrite_probes(loaded, resolved)

    def read_unedited(loaded: LoadedModel) -> tuple[list[EvalRecord], list[dict[str, float]], list[PromptScore]]:
        prepared = shared.editor.prepare([r.request for r in records], refuse_current=False)
        resolved = resolve(loaded, records, prepared)
        return resolved, *read(loaded, resolved)

    resolved, scores, probes = base.run(read_unedited)
    out = [_compare_row("unedited", resolved, scores, probes, seed)]
    for algorithm in algorithms:
        step(algorithm)
        try:
            hp = ((hparams or {}).get(algorithm) or base.hparams(algorithm)).replace(seed=seed)
            outcome = Session(shared).edit(
                [r.request for r in resolved], algorithm, hparams=hp, refuse_current=False, keep=False,
                on_phase=on_phase, after=lambda loaded, _: read(loaded, resolved))
        except EditError as exc:
            out.append(CompareRow(algorithm, error=str(exc), seed=seed))
            continue
        row = _compare_row(algorithm, resolved, *outcome.after, seed)
        record = outcome.record
        row.norms, row.seconds, row.layers, row.hparams = record.norms, record.seconds, record.layers, hp.to_dict()
        out.append(row)
    return out


def _compare_row(algorithm: str, resolved: list[EvalRecord], scores: list[dict[str, float]],
                 probes: list[PromptScore], seed: int) -> CompareRow:
    return CompareRow(algorithm, summarise(scores), [p.p_new for p in probes], [p.p_true for p in probes],
                      per_fact=fact_rows(resolved, scores, probes), seed=seed)
