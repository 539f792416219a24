"""The Editor: apply ROME / MEMIT / EMMET edits to a loaded model, undo them exactly.

Every ``apply`` validates all requests before touching a weight, snapshots the layers it
will change, and restores that snapshot if anything fails, so an error always leaves
the model bit-for-bit as it was. ``undo`` and ``reset`` copy saved tensors back; they
never subtract a delta (which would not be exact in floating point).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidRequestError, NumericalError, UnsupportedModelError
from .hparams import HParams, load_preset
from .keys import compute_keys, layer_outputs
from .models import LoadedModel
from .probe import greedy_answer, score_targets
from .request import EditRequest, check_conflicts
from .solvers import emmet_update, memit_update, rome_update
from .stats import layer_covariances
from .templates import context_templates
from .value_cache import cached_values
from .values import compute_values

log = logging.getLogger(__name__)

RequestLike = EditRequest | Mapping[str, str]


@dataclass
class LayerUpdate:
    """What was solved at one layer: keys K (d_k, N), residuals R (d, N), update Δ (d, d_k)."""

    layer: int
    keys: torch.Tensor
    residuals: torch.Tensor
    delta: torch.Tensor

    @property
    def norm(self) -> float:
        return float(self.delta.norm())


@dataclass
class EditResult:
    algorithm: str
    hparams: HParams
    requests: list[EditRequest]
    updates: list[LayerUpdate] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    value_loss_before: list[float] = field(default_factory=list)
    value_loss_after: list[float] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted({u.layer for u in self.updates})

    @property
    def norms(self) -> dict[int, float]:
        """‖Δ‖_F per layer (summed over the updates of sequential ROME edits)."""
        total: dict[int, torch.Tensor] = {}
        for update in self.updates:
            total[update.layer] = total.get(update.layer, 0) + update.delta
        return {layer: float(delta.norm()) for layer, delta in sorted(total.items())}

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "layers": self.layers,
            "requests": [vars(r) for r in self.requests],
            "delta_norms": {str(k): v for k, v in self.norms.items()},
            "seconds": self.seconds,
            "value_loss_before": self.value_loss_before,
            "value_loss_after": self.value_loss_after,
            "hparams": self.hparams.to_dict(),
        }


@dataclass
class _Applied:
    result: EditResult
    before: dict[int, torch.Tensor]  # the weights of the touched layers before this edit


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Editor:
    """Edits one loaded model. Not thread-safe: share a model across users only with a
    lock around apply/evaluate/undo, or with one Editor per model copy."""

    def __init__(self, loaded: LoadedModel, on_phase: Callable[[str], None] | None = None) -> None:
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.history: list[_Applied] = []
        self._original: dict[int, torch.Tensor] = {}
        self._covs: dict[tuple, torch.Tensor] = {}
        self.on_phase = on_phase
        self._cache_ok = False  # may v* come from the disk cache in the current apply?

    # -- public API ------------------------------------------------------------------------
    def hparams(self, algorithm: str, **overrides: object) -> HParams:
        """The preset for this model and algorithm, with ``overrides`` applied."""
        hp = load_preset(self.loaded.name, algorithm, self.adapter.num_layers)
        return hp.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else hp

    def apply(
        self, requests: Iterable[RequestLike], algorithm: str = "rome", hparams: HParams | None = None,
        refuse_current: bool = True, cache_values: bool = False, **overrides: object,
    ) -> EditResult:
        """Apply a batch of edits (ROME: one after the other) and return what was done.

        ``refuse_current=False`` lets through facts whose new object the model already
        gives (benchmarks edit every record; a user asking for it made a mistake).
        ``cache_values=True`` reuses value targets v* from disk (:mod:`value_cache`) while
        the weights are the original ones; only this Editor's history can tell that, so
        callers that change weights behind its back must leave it off."""
        started = time.perf_counter()
        hp = hparams if hparams is not None else self.hparams(algorithm, **overrides)
        for layer in hp.layers:
            self.adapter.device(layer)  # in range and resident (not offloaded by a device map)
        timer = _Timer()
        with timer.phase("prepare"):
            batch = self.prepare(requests, refuse_current)
        covs = self._covariances(hp, timer)
        before = {layer: self.adapter.weight(layer).detach().clone() for layer in hp.layers}
        result = EditResult(hp.algorithm, hp, batch)
        self._cache_ok = cache_values and not self.history
        try:
            if hp.algorithm == "rome":
                self._rome(batch, hp, covs, result, timer)
            else:
                self._memit_emmet(batch, hp, covs, result, timer)
            for layer in hp.layers:
                if not torch.isfinite(self.adapter.weight(layer)).all():
                    raise NumericalError(f"layer {layer} has NaN/Inf after the update (dtype overflow?)")
        except BaseException:
            self._restore(before)
            raise
        for layer, weight in before.items():
            self._original.setdefault(layer, weight)
        result.seconds = {**timer.seconds, "total": time.perf_counter() - started}
        self.history.append(_Applied(result, before))
        return result

    def prepare(self, requests: Iterable[RequestLike], refuse_current: bool = True) -> list[EditRequest]:
        """Validate requests, fill in missing old objects with the model's own answer, and
        refuse targets the model already gives."""
        batch = [r if isinstance(r, EditRequest) else EditRequest(**r) for r in requests]
        if not batch:
            raise InvalidRequestError("no edit requests given")
        check_conflicts(batch)
        missing = [i for i, r in enumerate(batch) if r.target_true is None]
        if missing:
            answers = greedy_answer(self.loaded, [batch[i].text for i in missing])
            for i, answer in zip(missing, answers):
                if answer == batch[i].target_new:
                    raise InvalidRequestError(f"the model already answers {answer!r} to {batch[i].text!r}")
                batch[i] = batch[i].with_target_true(answer)
        if not refuse_current:
            return batch
        scores = score_targets(self.loaded, [r.text for r in batch], [r.target_new for r in batch])
        for request, score in zip(batch, scores):
            if score.greedy:
                raise InvalidRequestError(
                    f"the model already answers {request.target_new!r} to {request.text!r}"
                )
        return batch

    def covariance(self, layer: int, hparams: HParams) -> torch.Tensor:
        """C0 = E[k kᵀ] of ``layer`` under ``hparams``' corpus settings (cached)."""
        self.adapter.check_layer(layer)
        return self._covariances(hparams.replace(layers=(layer,)), _Timer())[layer]

    def warm_values(self, requests: Iterable[RequestLike], hparams: HParams,
                    progress: Callable[[int], object] | None = None) -> None:
        """Optimise and cache v* for many facts in shared batches, ahead of applying them
        one chunk at a time (ROME one by one, small MEMIT/EMMET batches), which would
        otherwise run the value optimisation on a handful of prompts per pass. Only on the
        unedited model, whose values the cache holds. ``progress(k)`` hears of every k facts done."""
        if self.history:
            raise InvalidRequestError("warm_values needs the unedited model (undo or reset first)")
        batch = [r if isinstance(r, EditRequest) else EditRequest(**r) for r in requests]
        layer, site = self._value_site(hparams)
        cached_values(self.loaded, batch, self._templates(hparams, _Timer()), layer, site, hparams.values,
                      progress=progress)

    def undo(self) -> EditResult:
        """Revert the last ``apply`` exactly."""
        if not self.history:
            raise InvalidRequestError("nothing to undo")
        applied = self.history.pop()
        self._restore(applied.before)
        return applied.result

    def reset(self) -> None:
        """Restore the original weights of every layer ever edited."""
        self._restore(self._original)
        self.history.clear()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the (edited) model and tokenizer as a safetensors checkpoint."""
        from safetensors.torch import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.loaded.device_map:  # offloaded weights are on disk or the CPU: transformers gathers them
            self.loaded.model.save_pretrained(path)
            self.loaded.tokenizer.save_pretrained(path)
            return path
        self.loaded.model.config.save_pretrained(path)
        save_model(self.loaded.model, str(path / "model.safetensors"), metadata={"format": "pt"})
        self.loaded.tokenizer.save_pretrained(path)
        return path

    # -- internals -------------------------------------------------------------------------
    def _phase(self, timer: _Timer, name: str):
        if self.on_phase is not None:
            self.on_phase(name)
        return timer.phase(name)

    def _restore(self, weights: dict[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, weight in weights.items():
                self.adapter.weight(layer).copy_(weight)

    def _covariances(self, hp: HParams, timer: _Timer) -> dict[int, torch.Tensor]:
        keys = {layer: (layer, *hp.stats_settings) for layer in hp.layers}
        todo = [layer for layer, key in keys.items() if key not in self._covs]
        if todo:
            with self._phase(timer, "stats"):
                found = layer_covariances(self.loaded, todo, hp.stats_corpus, hp.stats_tokens,
                                          getattr(torch, hp.stats_dtype), precision=hp.stats_precision)
            for layer, cov in found.items():  # C0 lives beside the matrix it constrains
                self._covs[keys[layer]] = cov.to(self.adapter.device(layer))
        return {layer: self._covs[key] for layer, key in keys.items()}

    def _templates(self, hp: HParams, timer: _Timer) -> list[str]:
        with self._phase(timer, "templates"):
            return context_templates(self.loaded, [list(x) for x in hp.context_templates], seed=hp.seed)

    def _value_site(self, hp: HParams) -> tuple[int, str]:
        """Where v* lives: ROME at its layer's MLP output; MEMIT/EMMET in the residual
        after the last edited layer, unless the family normalises the MLP output (then at
        the MLP output itself, and one layer only)."""
        at_mlp = hp.algorithm == "rome" or self.adapter.spec.post_mlp_norm is not None
        if at_mlp and len(hp.layers) > 1:
            raise UnsupportedModelError(
                f"{self.adapter.model_type} normalises the MLP output ({self.adapter.spec.post_mlp_norm}), so "
                "one residual cannot be spread over several layers; edit a single layer"
            )
        return hp.layers[-1], "mlp" if at_mlp else "residual"

    def _values(self, batch: list[EditRequest], templates: list[str], layer: int, site: str, hp: HParams):
        if self._cache_ok:
            return cached_values(self.loaded, batch, templates, layer, site, hp.values)
        return compute_values(self.loaded, batch, templates, layer, site, hp.values)

    def _rome(self, batch, hp: HParams, covs, result: EditResult, timer: _Timer) -> None:
        (layer,) = hp.layers
        templates = self._templates(hp, timer)
        for request in batch:
            with self._phase(timer, "keys"):
                key, plain = compute_keys(self.loaded, [request], templates, layer, mode="mean")
            with self._phase(timer, "values"):
                values = self._values([request], templates, layer, "mlp", hp)
                self._cache_ok = False  # the next fact sees the weights this one changes
            with self._phase(timer, "solve"):  # on the device of the layer, where C0 is
                here = covs[layer].device
                key, plain = key.to(here), plain.to(here)
                constraint = plain[:, 0] if hp.rome_variant == "original" else None
                current = self.adapter.project(layer, (plain if constraint is not None else key))[:, 0]
                residual = values.values[0].to(here, torch.float64) - current.to(here)
                delta = rome_update(residual, key[:, 0], covs[layer], constraint_key=constraint)
                self.adapter.add_delta(layer, delta)
            result.updates.append(LayerUpdate(layer, key.cpu(), residual[:, None].cpu(), delta.float().cpu()))
            result.value_loss_before += values.loss_before.tolist()
            result.value_loss_after += values.loss_after.tolist()

    def _memit_emmet(self, batch, hp: HParams, covs, result: EditResult, timer: _Timer) -> None:
        z_layer, site = self._value_site(hp)
        at_mlp = site == "mlp"
        templates = self._templates(hp, timer)
        with self._phase(timer, "values"):
            values = self._values(batch, templates, z_layer, site, hp)
        targets = values.values.T.to(torch.float64)  # (d, N)
        result.value_loss_before = values.loss_before.tolist()
        result.value_loss_after = values.loss_after.tolist()
        for i, layer in enumerate(hp.layers):
            with self._phase(timer, "keys"):
                keys, _ = compute_keys(self.loaded, batch, templates, layer, mode="half")
                if at_mlp:  # what W produces now for the averaged keys
                    current = self.adapter.project(layer, keys)
                else:  # the residual at the subject's last token of the plain prompt
                    current = layer_outputs(self.loaded, batch, z_layer).to(torch.float64)
            with self._phase(timer, "solve"):
                # On the device of this layer, where C0 is; the residual comes from the last
                # edited layer, which a device map may have put on another GPU.
                here = covs[layer].device
                keys = keys.to(here)
                residuals = (targets.to(here) - current.to(here)) / (len(hp.layers) - i)
                if hp.algorithm == "memit":
                    delta = memit_update(residuals, keys, covs[layer], hp.mom2_update_weight)
                else:
                    ridge = hp.ridge if (len(batch) > 1 or hp.ridge_single) else 0.0
                    delta = emmet_update(residuals, keys, covs[layer], ridge)
                self.adapter.add_delta(layer, delta)
            result.updates.append(LayerUpdate(layer, keys.cpu(), residuals.cpu(), delta.float().cpu()))
