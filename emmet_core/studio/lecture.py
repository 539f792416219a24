"""Lecture mode: the ready-made examples edited in seconds in front of an audience.

The slow part of an edit is optimising the target value v* (:mod:`values`). It depends
on the weights, so the disk cache (:mod:`value_cache`) holds v* of the original weights
only. Preparing the examples fills it ahead of the lecture; an edit asked to use it then
reads v* from disk when the session holds no earlier edit, and says whether it did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..hparams import HParams
from ..request import EditRequest
from .workspace import EditRecord, SharedModel


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_examples` did for one editor."""

    algorithm: str
    facts: int
    seconds: float


def example_requests(examples: Sequence[dict[str, Any]]) -> list[EditRequest]:
    """The edit requests of examples as ``assets/examples.json`` writes them (the old
    object is left out: the model names its own, and v* does not depend on it)."""
    return [EditRequest(e["prompt"], e["subject"], e["target_new"]) for e in examples]


def prepare_examples(shared: SharedModel, requests: Sequence[EditRequest], algorithm: str,
                     hparams: HParams | None = None, progress: Callable[[int], object] | None = None,
                     on_wait: Callable[[], None] | None = None) -> Prepared:
    """Optimise and cache v* of ``requests`` for ``algorithm`` (its preset unless
    ``hparams``) on the original weights, under the model's lock. An edit with these
    settings and ``cache_values=True`` on an unedited session then reads v* from disk.
    ``progress(k)`` hears of every k facts done (the cached ones at once)."""
    hp = hparams if hparams is not None else shared.editor.hparams(algorithm)
    started = time.perf_counter()
    with shared.holding([], on_wait):  # the original weights: the only ones the cache is for
        shared.editor.warm_values(requests, hp, progress=progress)
    return Prepared(hp.algorithm, len(requests), time.perf_counter() - started)


def value_cache_note(record: EditRecord) -> str | None:
    """One line on where an edit's v* came from, or None when it did not ask for the
    cache. Times shown beside a cached edit are not the cost of an edit: say so."""
    states = {result.value_cache for result in record.results}
    if states == {"off"}:
        return None
    facts, hits = len(record.requests), record.values_cached
    if hits and hits == facts:
        return "v* from cache (prepared): the slow optimisation was done ahead, so the time is not an edit's cost."
    if hits:
        return f"v* from cache (prepared) for {hits} of {facts} facts; the others were optimised now."
    if states == {"edited"}:
        return ("v* computed fresh: this session already holds edits, and the cache has v* of the original "
                "weights only.")
    return "v* computed fresh: not prepared yet (it is cached now, for the next time on the original weights)."
