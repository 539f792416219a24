"""Many users, one model: private edit histories over one shared loaded model.

A model takes seconds to load and its memory, so an app serves every browser session
from one copy (:class:`SharedModel`). Each :class:`Session` keeps its own edits as the
weight changes they made: the Δ of every layer update, in the order the Editor added
them. To act for a session, the shared model takes its lock, writes that session's
weights (original + its deltas, replayed in order), runs the work, and copies the
original weights back before it releases the lock. Outside the lock the model always
holds its original weights, so no session ever sees another's edits.

Replaying float32 deltas into float32 weights repeats the Editor's own additions
exactly. Every new edit is checked: if the replay does not reproduce the weights bit for
bit (half-precision models round a float64 Δ differently), the record keeps the exact
weights of its layers instead, so a session's model is always the one it edited.
"""

from __future__ import annotations

import io
import json
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

from .editor import Editor, EditResult, RequestLike
from .errors import EditError, InvalidRequestError
from .hparams import HParams
from .models import LoadedModel
from .probe import greedy_answer
from .request import EditRequest
from .templates import context_templates

T = TypeVar("T")
PhaseCallback = Callable[[str], None]
Reader = Callable[[LoadedModel, list[EditRequest]], Any]


class ModelBusyError(EditError):
    """Another session holds the model longer than the caller wanted to wait."""


@dataclass
class EditRecord:
    """One applied edit of one session (a chunked batch run counts as one)."""

    label: str
    algorithm: str
    results: list[EditResult]
    deltas: list[tuple[int, torch.Tensor]]  # (layer, Δ (d, d_k)) on the CPU, in the order added
    created: float = field(default_factory=time.time)
    summary: dict[str, Any] = field(default_factory=dict)  # numbers the app shows and logs
    pinned: dict[int, torch.Tensor] = field(default_factory=dict)  # exact weights when a replay is not

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.deltas})

    @property
    def requests(self) -> list[EditRequest]:
        return [r for result in self.results for r in result.requests]

    @property
    def norms(self) -> dict[int, float]:
        """‖Δ‖_F per layer, all updates of this record summed."""
        total: dict[int, torch.Tensor] = {}
        for layer, delta in self.deltas:
            total[layer] = total.get(layer, 0) + delta
        return {layer: float(delta.norm()) for layer, delta in sorted(total.items())}

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
            "requests": [vars(r) for r in self.requests],
            "hparams": self.results[0].hparams.to_dict() if self.results else None,
            "summary": self.summary,
            "exact_weights_kept": bool(self.pinned),
        }


@dataclass
class Outcome:
    """What :meth:`Session.edit` did: the record and what the readers saw around it."""

    record: EditRecord
    before: Any
    after: Any


class SharedModel:
    """One loaded model for every session of a process, with the lock that guards it."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.editor = Editor(loaded)
        self.lock = threading.Lock()
        self._original: dict[int, torch.Tensor] = {}  # layer -> weight before any edit
        self._prepared: set[tuple] = set()  # (layer, stats settings) whose C0 the Editor holds

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

    def covariance(self, hp: HParams, layer: int) -> torch.Tensor | None:
        """C0 of ``layer`` as computed for an edit with ``hp`` (None before such an edit)."""
        return self.editor.covariance(layer, hp) if _stats_key(hp, layer) in self._prepared else None

    # -- under the lock only ---------------------------------------------------------------
    def _prepare_layers(self, hp: HParams, on_phase: PhaseCallback | None) -> None:
        """Keep the original weights of ``hp.layers`` and compute what an edit of them reads
        from the unedited model (C0 and context templates, both cached on disk), so they
        never depend on which session happened to ask first."""
        adapter = self.loaded.adapter
        for layer in hp.layers:
            adapter.check_layer(layer)
            if layer not in self._original:
                self._original[layer] = adapter.weight(layer).detach().clone()
        missing = [layer for layer in hp.layers if _stats_key(hp, layer) not in self._prepared]
        if missing and on_phase is not None:
            on_phase("stats")
        for layer in missing:  # held by the shared Editor, which every edit reads it from
            self.editor.covariance(layer, hp)
            self._prepared.add(_stats_key(hp, layer))
        if on_phase is not None:
            on_phase("templates")
        context_templates(self.loaded, [list(x) for x in hp.context_templates], seed=hp.seed)

    def _restore(self) -> None:
        with torch.no_grad():
            for layer, weight in self._original.items():
                self.loaded.adapter.weight(layer).copy_(weight)

    def _write(self, records: Sequence[EditRecord]) -> None:
        """Original weights, then each record's deltas in order (or its exact weights)."""
        self._restore()
        adapter = self.loaded.adapter
        for record in records:
            if record.pinned:
                with torch.no_grad():
                    for layer, weight in record.pinned.items():
                        adapter.weight(layer).copy_(weight)
            else:
                for layer, delta in record.deltas:
                    adapter.add_delta(layer, delta)

    def _snapshot(self, layers: list[int]) -> dict[int, torch.Tensor]:
        return {layer: self.loaded.adapter.weight(layer).detach().clone() for layer in layers}


def _stats_key(hp: HParams, layer: int) -> tuple:
    return layer, *hp.stats_settings


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


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

    @contextmanager
    def active(self, on_wait: Callable[[], None] | None = None,
               timeout: float | None = None) -> Iterator[LoadedModel]:
        """The shared model holding this session's weights, for as long as the block runs."""
        with self.shared.locked(on_wait, timeout):
            self.shared._write(self.records)
            try:
                yield self.shared.loaded
            finally:
                self.shared._restore()

    def run(self, work: Callable[[LoadedModel], T], on_wait: Callable[[], None] | None = None,
            timeout: float | None = None) -> T:
        """``work(loaded)`` on this session's model (reading only: writes are undone)."""
        with self.active(on_wait, timeout) as loaded:
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
        with shared.locked(on_wait):
            shared._prepare_layers(hp, on_phase)
            shared._write(self.records)
            editor.on_phase = on_phase
            try:
                phase("prepare")
                prepared = editor.prepare(requests, refuse_current)
                phase("before")
                seen_before = before(shared.loaded, prepared) if before is not None else None
                record = self._apply(prepared, hp, chunk_size, label, on_chunk, cache_values)
                phase("after")
                seen_after = after(shared.loaded, prepared) if after is not None else None
            finally:
                editor.on_phase = None
                editor.history.clear()  # undo lives in the sessions, not in the shared Editor
                shared._restore()
        if keep:
            self.records.append(record)
            self.version += 1
        return Outcome(record, seen_before, seen_after)

    def _apply(self, prepared: list[EditRequest], hp: HParams, chunk_size: int | None, label: str | None,
               on_chunk: Callable[[int, int], None] | None, cache_values: bool) -> EditRecord:
        size = chunk_size or len(prepared)
        chunks = [prepared[i : i + size] for i in range(0, len(prepared), size)]
        results = []
        for index, chunk in enumerate(chunks):
            original = index == 0 and not self.records  # the cache holds v* of the original weights only
            results.append(self.shared.editor.apply(chunk, hparams=hp, refuse_current=False,
                                                    cache_values=cache_values and original))
            self.shared.editor.history.clear()
            if on_chunk is not None:
                on_chunk(index + 1, len(chunks))
        deltas = [(u.layer, u.delta) for result in results for u in result.updates]
        record = EditRecord(label or default_label(hp.algorithm, prepared), hp.algorithm, results, deltas)
        self._check_replay(record)
        return record

    def _check_replay(self, record: EditRecord) -> None:
        """Make sure writing this session later gives exactly the weights just made."""
        shared = self.shared
        made = shared._snapshot(record.layers)
        shared._write([*self.records, record])
        if not all(_bits_equal(shared.loaded.adapter.weight(layer), made[layer]) for layer in made):
            record.pinned = {layer: weight.cpu() for layer, weight in made.items()}
            shared._write([*self.records, record])

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
