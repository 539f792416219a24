"""Disk cache of value targets v*, the expensive per-fact part of an edit.

A fact's v* depends on the model's weights, the layer and site, the value
hyper-parameters and the context templates, but not on the other facts of its batch
(each fact has its own loss and early stop; only float rounding of the shared padding
differs). So a benchmark that runs the same facts at several batch sizes, or an
undo-then-redo in the app, optimises each v* once. The cache is only valid for the
weights it was computed on: callers use it only on the unedited model, which the key
names by fingerprint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .diskcache import digest, tensors_sha, write_atomic
from .models import LoadedModel, cache_dir
from .request import EditRequest
from .values import PER_FACT, StepCallback, ValueConfig, ValueResult, compute_values


def group_key(loaded: LoadedModel, layer: int, site: str, config: ValueConfig, templates: list[str]) -> str:
    """Everything v* depends on apart from the fact itself (not how facts are grouped)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "rows_per_pass"}
    return digest({"model": loaded.fingerprint, "layer": layer, "site": site,
                   "config": settings, "templates": templates, "v": 3})


def fact_key(request: EditRequest) -> str:
    return digest([request.prompt, request.subject, request.target_new])


def cached_values(
    loaded: LoadedModel,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    site: str,
    config: ValueConfig,
    root: Path | None = None,
    progress: Callable[[int], object] | None = None,
    on_step: StepCallback | None = None,
) -> ValueResult:
    """:func:`values.compute_values`, optimising only the facts not cached yet
    (``progress`` hears of the cached ones at once). The result's ``cached`` says how
    many facts were read from disk, so an app can say whether an edit's v* was prepared."""
    folder = (root or cache_dir() / "values") / group_key(loaded, layer, site, config, templates)
    paths = [folder / f"{fact_key(r)}.safetensors" for r in requests]
    found = {i: _read(p) for i, p in enumerate(paths) if p.is_file()}
    found = {i: row for i, row in found.items() if row is not None}
    todo = [i for i in range(len(requests)) if i not in found]
    hits, steps = len(found), 0
    if progress is not None and found:
        progress(len(found))
    if todo:
        fresh = compute_values(loaded, [requests[i] for i in todo], templates, layer, site, config, progress,
                               on_step)
        steps = fresh.steps
        folder.mkdir(parents=True, exist_ok=True)
        host = {name: getattr(fresh, name).detach().float().cpu() for name in PER_FACT}  # one copy per field
        for j, i in enumerate(todo):
            row = {name: host[name][j].reshape(-1).clone() for name in PER_FACT}
            _write(paths[i], row)
            found[i] = row
    device = loaded.adapter.device(layer)  # where the values are used: beside their layer
    joined = {name: torch.stack([found[i][name] for i in range(len(requests))]).to(device) for name in PER_FACT}
    for name in ("loss_before", "nll_after", "loss_after"):
        joined[name] = joined[name][:, 0]
    return ValueResult(**joined, steps=steps, cached=hits)


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    """A fact's cached v* if the file is whole, ours and unchanged; else None (recompute)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            row = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:  # a torn or foreign file: recompute that fact
        return None
    if set(row) != set(PER_FACT) or meta.get("sha256") != tensors_sha(row):
        return None
    return row if all(torch.isfinite(t).all() for t in row.values()) else None


def _write(path: Path, row: dict[str, torch.Tensor]) -> None:
    row = {k: v.contiguous() for k, v in row.items()}
    write_atomic(path, lambda tmp: save_file(row, str(tmp), metadata={"sha256": tensors_sha(row)}))
