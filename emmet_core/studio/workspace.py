"""Many users, one model: private edit histories over one shared loaded model.

A model takes seconds to load and its memory, so an app serves every browser session
from one copy (:class:`SharedModel`). Each :class:`Session` keeps its own edits as data,
the :class:`ledger.Delta` list of every edit it applied. To act for a session, the shared
model takes its lock, has its :class:`ledger.Ledger` write that session's weights
(original + its deltas in order, bit-exact by construction), runs the work, and writes
the original weights back before it releases the lock. Outside the lock the model always
holds its original weights, so no session ever sees another's edits.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import torch

from ..editor import Editor, EditResult, PhaseCallback, RequestLike, combined_norms
from ..errors import EditError, InvalidRequestError
from ..hparams import HParams
from ..ledger import Delta, Ledger, layers_of
from ..models import LoadedModel, export_dir
from ..readout import greedy_answer
from ..request import EditRequest

T = TypeVar("T")
Reader = Callable[[LoadedModel, list[EditRequest]], Any]


class ModelBusyError(EditError):
    """Another session holds the model longer than the caller wanted to wait."""


@dataclass
class EditRecord:
    """One applied edit of one session (a chunked batch run counts as one)."""

    label: str
    algorithm: str
    results: list[EditResult]
    created: float = field(default_factory=time.time)
    summary: dict[str, Any] = field(default_factory=dict)  # numbers the app shows and logs

    @property
    def deltas(self) -> list[Delta]:
        """Its changes to the weights, in the order they were added."""
        return [d for result in self.results for d in result.deltas]

    @property
    def layers(self) -> list[int]:
        return layers_of(self.deltas)

    @property
    def requests(self) -> list[EditRequest]:
        return [r for result in self.results for r in result.requests]

    @property
    def norms(self) -> dict[int, float]:
        """‖Δ‖_F per layer, all updates of this record summed."""
        return combined_norms(self.results)

    @property
    def values_cached(self) -> int:
        """Facts whose v* came from the disk cache (0 unless the edit asked for the cache)."""
        return sum(result.values_cached for result in self.results)

    @property
    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for result in self.results:
            for phase, value in result.seconds.items():
                out[phase] = out.get(phase, 0.0) + value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "algorithm": self.algorithm,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.created)),
            "layers": self.layers,
            "delta_norms": {str(k): v for k, v in self.norms.items()},
            "seconds": self.seconds,
            "values_cached": self.values_cached,
            "requests": [vars(r) for r in self.requests],
            "hparams": self.results[0].hparams.to_dict() if self.results else None,
            "summary": self.summary,
        }


@dataclass
class Outcome:
    """What :meth:`Session.edit` did: the record and what the readers saw around it."""

    record: EditRecord
    before: Any
    after: Any


class SharedModel:
    """One loaded model for every session of a process: its ledger, the Editor that
    computes edits on it, and the lock that guards both."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.ledger = Ledger(loaded.adapter)
        self.editor = Editor(loaded, ledger=self.ledger)
        self.lock = threading.Lock()

    @contextmanager
    def locked(self, on_wait: Callable[[], None] | None = None, timeout: float | None = None) -> Iterator[None]:
        """Hold the model; ``on_wait`` is called once if another session has it, and
        after ``timeout`` seconds of waiting :class:`ModelBusyError` is raised."""
        if not self.lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
                raise ModelBusyError("the model is busy with another session's edit; try again in a moment")
        try:
            yield
        finally:
            self.lock.release()

    @contextmanager
    def holding(self, deltas: Sequence[Delta], on_wait: Callable[[], None] | None = None,
                timeout: float | None = None) -> Iterator[LoadedModel]:
        """The model with original + ``deltas`` for the block, under the lock; original again after."""
        with self.locked(on_wait, timeout):
            try:
                self.ledger.write(deltas)
                yield self.loaded
            finally:
                self.ledger.write([])

    def covariance(self, hp: HParams, layer: int) -> torch.Tensor | None:
        """C0 of ``layer`` as computed for an edit with ``hp`` (None before such an edit)."""
        return self.editor.known_covariance(layer, hp)


class Session:
    """One user's private view of a :class:`SharedModel`: the edits they applied."""

    def __init__(self, shared: SharedModel) -> None:
        self.shared = shared
        self.records: list[EditRecord] = []
        self.id = uuid4().hex[:8]
        self.version = 0  # bumped on every change, for caches of what the model says

    @property
    def loaded(self) -> LoadedModel:
        return self.shared.loaded

    @property
    def deltas(self) -> list[Delta]:
        """Every change this session made, in order."""
        return [d for record in self.records for d in record.deltas]

    @contextmanager
    def active(self, on_wait: Callable[[], None] | None = None,
               timeout: float | None = None) -> Iterator[LoadedModel]:
        """The shared model holding this session's weights, for as long as the block runs."""
        with self.shared.holding(self.deltas, on_wait, timeout) as loaded:
            yield loaded

    def run(self, work: Callable[[LoadedModel], T], on_wait: Callable[[], None] | None = None,
            timeout: float | None = None) -> T:
        """``work(loaded)`` on this session's model (reading only: writes are undone)."""
        with self.active(on_wait, timeout) as loaded:
            return work(loaded)

    def around(self, record: EditRecord) -> tuple[list[Delta], list[Delta]]:
        """This session's changes just before ``record`` and just after it, so what the
        edit did can still be read (e.g. its texts generated) after later page runs."""
        index = next((i for i, kept in enumerate(self.records) if kept is record), None)
        if index is None:
            raise InvalidRequestError("that edit is no longer in this session (undone or reset)")
        before = [d for kept in self.records[:index] for d in kept.deltas]
        return before, before + record.deltas

    def run_on(self, deltas: Sequence[Delta], work: Callable[[LoadedModel], T],
               on_wait: Callable[[], None] | None = None, timeout: float | None = None) -> T:
        """``work(loaded)`` on the original weights plus ``deltas`` (from :meth:`around`)."""
        with self.shared.holding(deltas, on_wait, timeout) as loaded:
            return work(loaded)

    def answer(self, prompts: list[str], timeout: float | None = None) -> list[str]:
        """What this session's model says after each prompt (its greedy answer)."""
        return self.run(lambda loaded: greedy_answer(loaded, prompts), timeout=timeout)

    def hparams(self, algorithm: str, **overrides: object) -> HParams:
        return self.shared.editor.hparams(algorithm, **overrides)

    def edit(
        self,
        requests: Sequence[RequestLike],
        algorithm: str = "rome",
        *,
        hparams: HParams | None = None,
        refuse_current: bool = True,
        chunk_size: int | None = None,
        before: Reader | None = None,
        after: Reader | None = None,
        keep: bool = True,
        cache_values: bool = False,
        label: str | None = None,
        on_phase: PhaseCallback | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Outcome:
        """Apply ``requests`` to this session's model and read it before and after.

        ``before``/``after`` get the model and the checked requests (old objects filled
        in). ``chunk_size`` applies the facts in consecutive batches (sequentially, all
        kept). ``keep=False`` tries the edit and forgets it. ``cache_values`` lets v*
        come from (and go to) the disk cache while the weights are the original ones:
        faster repeats, but the times shown are then not the cost of an edit. Any error
        leaves the session and the shared model as they were."""
        hp = hparams if hparams is not None else self.hparams(algorithm)
        shared, editor = self.shared, self.shared.editor
        phase = on_phase or (lambda name: None)
        with shared.holding(self.deltas, on_wait) as loaded:
            phase("prepare")
            prepared = editor.prepare(requests, refuse_current)
            phase("before")
            seen_before = before(loaded, prepared) if before is not None else None
            size = chunk_size or len(prepared)
            results = []
            for first in range(0, len(prepared), size):  # each chunk sees the ones before it
                held = [r for record in self.records for r in record.results] + results  # what the model holds
                result = editor.compute(prepared[first : first + size], hparams=hp, checked=True,
                                        cache_values=cache_values, on_phase=on_phase, previous=held)
                shared.ledger.push(result.deltas)
                results.append(result)
                if on_chunk is not None:
                    on_chunk(len(results), -(-len(prepared) // size))
            phase("after")
            seen_after = after(loaded, prepared) if after is not None else None
        record = EditRecord(label or default_label(hp.algorithm, prepared), hp.algorithm, results)
        if keep:
            self.records.append(record)
            self.version += 1
        return Outcome(record, seen_before, seen_after)

    def undo(self) -> EditRecord:
        """Forget the last edit (the shared weights are untouched: they are original)."""
        if not self.records:
            raise InvalidRequestError("nothing to undo")
        self.version += 1
        return self.records.pop()

    def reset(self) -> None:
        """Back to the original model."""
        self.records.clear()
        self.version += 1

    def log(self) -> dict[str, Any]:
        """Everything applied in this session, as JSON-ready data."""
        loaded = self.loaded
        return {
            "model": loaded.name,
            "fingerprint": loaded.fingerprint,
            "device": str(loaded.device),
            "edits": [record.to_dict() for record in self.records],
        }

    def log_json(self) -> str:
        return json.dumps(self.log(), indent=2, ensure_ascii=False)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this session's model as a safetensors checkpoint directory."""
        return self.run(lambda loaded: self.shared.editor.save_pretrained(directory))

    def save_export(self) -> Path:
        """Save this session's model in the server's export folder (:func:`models.export_dir`),
        in a new directory named after the model, the edits, this session and the time."""
        root = export_dir()
        model = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.loaded.name).name).strip("-.") or "model"
        name = f"{model}-{len(self.records)}-edits-{self.id}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            return self.save_pretrained(root / name)
        except OSError as exc:
            raise EditError(f"cannot write to the export folder {root}: {exc.strerror or exc} "
                            "(the server's EMMET_EXPORT_DIR must be a writable folder)") from None

    def export_zip(self) -> bytes:
        """This session's model as a zip of its safetensors checkpoint directory."""
        with tempfile.TemporaryDirectory(prefix="emmet-export-") as tmp:
            path = self.save_pretrained(Path(tmp) / "model")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
                for file in sorted(path.iterdir()):
                    archive.write(file, f"{path.name}/{file.name}")
            return buffer.getvalue()


def default_label(algorithm: str, requests: Sequence[EditRequest]) -> str:
    first = requests[0]
    text = f"{algorithm.upper()}: {first.text} → {first.target_new}"
    return text if len(requests) == 1 else f"{text} (+{len(requests) - 1} more)"
