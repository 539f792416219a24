"""A lifelong run in the app: facts streamed into a model batch after batch, one or two
editors side by side, measured at checkpoints (:mod:`emmet_core.lifelong`).

Each editor has a lane: a :class:`workspace.Session` of its own over the shared model, so
it starts from the original weights and never sees another lane's edits, nor another
user's. :meth:`LifelongRun.step` does one unit of work (one batch of one lane, or one
checkpoint) and holds the model's lock only for that long, so other sessions get their
turn between steps; the page calls it again until the run is done, paused or stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..data import EvalRecord
from ..evaluate import score_records
from ..lifelong import Watch, measure, retention_sample
from ..models import LoadedModel
from .workspace import Session, SharedModel


@dataclass
class Lane:
    """One editor's sequence of edits and its checkpoints."""

    algorithm: str
    session: Session
    layers: list[int]
    curves: list[dict] = field(default_factory=list)
    edited: int = 0
    seconds: float = 0.0  # editing time, checkpoints excluded
    newest: list[dict] | None = None  # the last batch's scores just after it was applied


class LifelongRun:
    """The state of one run: its facts, its lanes, what each checkpoint measures."""

    def __init__(self, shared: SharedModel, records: list[EvalRecord], algorithms: list[str], batch_size: int,
                 checkpoint_every: int, heldout: list[EvalRecord], documents: list[str], prompt: str,
                 gen_tokens: int = 30, retention: int = 20) -> None:
        if not records:
            raise ValueError("no facts to stream")
        self.records, self.batch_size = records, max(batch_size, 1)
        self.checkpoint_every = max(checkpoint_every, self.batch_size)
        self.watch = Watch(retention_sample(records, retention), heldout, documents, prompt=prompt,
                           ge_records=min(len(heldout), 5), gen_tokens=gen_tokens)
        self.lanes = []
        for algorithm in algorithms:
            session = Session(shared)
            layers = list(session.hparams(algorithm).layers)
            self.lanes.append(Lane(algorithm, session, layers))
        adapter = shared.loaded.adapter  # the shared model holds its original weights outside the lock
        with shared.locked():
            self.watch.weight_norms = {layer: float(adapter.weight(layer).float().norm())
                                       for lane in self.lanes for layer in lane.layers}
        self.status = "ready"  # ready, running, paused, stopped, done
        self.started = time.time()

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def done(self) -> bool:
        return all(lane.edited >= self.total and self._measured(lane, self.total) for lane in self.lanes)

    def step(self, on_wait: Any = None) -> str:
        """One unit of work: a missing checkpoint, else the next batch of the lane that is
        furthest behind. Returns what was done, in words."""
        for lane in sorted(self.lanes, key=lambda lane: lane.edited):
            if not self._measured(lane, self._due(lane)):
                return self._checkpoint(lane, on_wait)
            if lane.edited < self.total:
                return self._batch(lane, on_wait)
        self.status = "done"
        return "done"

    def _due(self, lane: Lane) -> int:
        """The last checkpoint the lane has passed (0 before the first edit)."""
        if lane.edited >= self.total:
            return self.total
        return (lane.edited // self.checkpoint_every) * self.checkpoint_every

    def _measured(self, lane: Lane, edits: int) -> bool:
        return any(c["edits"] == edits for c in lane.curves)

    def _batch(self, lane: Lane, on_wait: Any) -> str:
        chunk = self.records[lane.edited : lane.edited + self.batch_size]
        started = time.perf_counter()
        outcome = lane.session.edit(
            [r.request for r in chunk], lane.algorithm, refuse_current=False, on_wait=on_wait,
            label=f"{lane.algorithm.upper()} lifelong batch", after=lambda loaded, _: self._score(loaded, chunk))
        lane.seconds += time.perf_counter() - started
        lane.edited += len(chunk)
        lane.newest = outcome.after
        return f"{lane.algorithm.upper()}: {lane.edited} of {self.total} facts edited"

    def _score(self, loaded: LoadedModel, chunk: list[EvalRecord]) -> list[dict]:
        return score_records(loaded, chunk, generation=False)

    def _checkpoint(self, lane: Lane, on_wait: Any) -> str:
        edits = self._due(lane)
        newest = lane.newest if edits else None
        editor = lane.session.shared.editor
        line = lane.session.run(lambda _: measure(editor, self.watch, edits, newest, "counterfact", lane.layers),
                                on_wait=on_wait)
        line["seconds"] = lane.seconds
        lane.curves.append(line)
        return f"{lane.algorithm.upper()}: checkpoint at {edits} edits"

    def progress(self) -> float:
        work = sum(lane.edited for lane in self.lanes)
        return work / max(self.total * len(self.lanes), 1)

    def to_dict(self) -> dict[str, Any]:
        """Everything a download holds: settings, facts, and every lane's checkpoints."""
        return {
            "model": self.lanes[0].session.loaded.name if self.lanes else None,
            "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
            "facts": [vars(r.request) for r in self.records], "prompt": self.watch.prompt,
            "heldout": [vars(r.request) for r in self.watch.heldout],
            "lanes": [{"algorithm": lane.algorithm, "layers": lane.layers, "edited": lane.edited,
                       "seconds": lane.seconds, "hparams": lane.session.hparams(lane.algorithm).to_dict(),
                       "curves": lane.curves} for lane in self.lanes],
        }


def checkpoints(total: int, every: int) -> int:
    """How many checkpoints a run of ``total`` facts makes (the unedited one included)."""
    return 1 + math.ceil(total / max(every, 1))
