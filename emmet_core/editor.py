"""The Editor: compute ROME / MEMIT / EMMET edits of a loaded model, apply and undo them.

An edit is computed inside :meth:`ledger.Ledger.scratch` (the weights it changes on the
way, layer by layer and fact by fact, are put back afterwards, also on error) and comes
out as data: an :class:`EditResult` whose :class:`ledger.Delta` list the ledger then adds,
checked. ``undo`` and ``reset`` replay the remaining deltas onto the original weights,
which is exact because a delta is stored in its weight's dtype. C0 and context templates
are always computed from the original weights (:meth:`ledger.Ledger.original`), whatever
the model holds when they are first asked for, so the caches never hold an edited
model's statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidRequestError, NumericalError, UnsupportedModelError
from .hparams import HParams, load_preset
from .keys import compute_keys, encode_in_template, layer_outputs
from .ledger import Delta, Ledger
from .models import LoadedModel
from .readout import greedy_answer, score_targets
from .request import EditRequest, check_conflicts, quote, request_from
from .solvers import alphaedit_update, emmet_update, encore_update, memit_update, null_space_projector, rome_update
from .stats import layer_covariances
from .templates import context_templates
from .tokens import target_ids
from .value_cache import cached_values
from .values import compute_values

log = logging.getLogger(__name__)

RequestLike = EditRequest | Mapping[str, str]
PhaseCallback = Callable[[str], None]


@dataclass
class LayerUpdate:
    """What was solved at one layer: keys K (d_k, N), residuals R (d, N) and the change
    added to W (a :class:`ledger.Delta`, in the weight's dtype)."""

    layer: int
    keys: torch.Tensor
    residuals: torch.Tensor
    change: Delta

    @property
    def delta(self) -> torch.Tensor:
        """Δ as a (d, d_k) float32 matrix, for pictures and norms."""
        return self.change.matrix.float()

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
    # The disk cache of v* (value_cache): "off" when not asked for; "original" when asked for
    # on the original weights, the only ones it holds v* of; "edited" when asked for but the
    # weights held edits, so every v* was optimised afresh. ``values_cached``: facts whose v*
    # was read from the cache (ROME: at most the first fact of a batch, whose v* is
    # optimised on the original weights; the later ones see the earlier facts' updates).
    value_cache: str = "off"
    values_cached: int = 0

    @property
    def deltas(self) -> list[Delta]:
        """The changes this edit makes, in the order they are added."""
        return [u.change for u in self.updates]

    @property
    def layers(self) -> list[int]:
        return sorted({u.layer for u in self.updates})

    @property
    def norms(self) -> dict[int, float]:
        """‖Δ‖_F per layer (summed over the updates of sequential ROME edits)."""
        return combined_norms([self])

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "layers": self.layers,
            "requests": [vars(r) for r in self.requests],
            "delta_norms": {str(k): v for k, v in self.norms.items()},
            "seconds": self.seconds,
            "value_loss_before": self.value_loss_before,
            "value_loss_after": self.value_loss_after,
            "value_cache": self.value_cache,
            "values_cached": self.values_cached,
            "hparams": self.hparams.to_dict(),
        }


def combined_norms(results: Iterable[EditResult]) -> dict[int, float]:
    """‖Δ‖_F per layer of several edits together (all their updates summed per layer)."""
    total: dict[int, torch.Tensor] = {}
    for result in results:
        for update in result.updates:
            total[update.layer] = total.get(update.layer, 0) + update.delta
    return {layer: float(delta.norm()) for layer, delta in sorted(total.items())}


class _Timer:
    """Seconds per phase; tells ``on_phase`` (a progress display) as each phase starts."""

    def __init__(self, on_phase: PhaseCallback | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_phase = on_phase

    def detail(self, name: str, text: str) -> None:
        """Progress inside a phase, told as ``"name: text"`` (e.g. ``values: step 3/25``)."""
        if self.on_phase is not None:
            self.on_phase(f"{name}: {text}")

    def value_steps(self, prefix: str = "") -> Callable[[int, int, int], None]:
        """The value optimisation's ``on_step``, told as details of the values phase."""
        def tell(step: int, steps: int, optimising: int) -> None:
            self.detail("values", f"{prefix}step {step}/{steps}, {optimising} fact(s) still optimising")
        return tell

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Editor:
    """Edits one loaded model. Not thread-safe: share a model across users only with a
    lock around compute/apply/undo (as :mod:`workspace` does), or one Editor per copy.

    ``apply``/``undo``/``reset`` keep this Editor's own history over ``ledger``;
    ``compute`` changes nothing and is what a caller with histories of its own uses."""

    def __init__(self, loaded: LoadedModel, on_phase: PhaseCallback | None = None,
                 ledger: Ledger | None = None) -> None:
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.ledger = ledger if ledger is not None else Ledger(self.adapter)
        self.history: list[EditResult] = []
        self.on_phase = on_phase
        self._covs: dict[tuple, torch.Tensor] = {}  # C0 of the original weights, by layer and settings
        self._templates: dict[tuple, list[str]] = {}  # context templates, by recipe and seed
        self._projectors: dict[tuple, torch.Tensor] = {}  # AlphaEdit's P, by layer, C0 and threshold

    # -- public API ------------------------------------------------------------------------
    def hparams(self, algorithm: str, **overrides: object) -> HParams:
        """The preset for this model and algorithm, with ``overrides`` applied."""
        hp = load_preset(self.loaded.name, algorithm, self.adapter.num_layers)
        return hp.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else hp

    def apply(
        self, requests: Iterable[RequestLike], algorithm: str = "rome", hparams: HParams | None = None,
        refuse_current: bool = True, cache_values: bool = False, **overrides: object,
    ) -> EditResult:
        """Compute a batch of edits (ROME: one after the other), add them to the model and
        return what was done.

        ``refuse_current=False`` lets through facts whose new object the model already
        gives (benchmarks edit every record; a user asking for it made a mistake).
        ``cache_values=True`` reuses value targets v* from disk (:mod:`value_cache`) when
        the weights are the original ones."""
        result = self.compute(requests, algorithm, hparams, refuse_current, cache_values, **overrides)
        self.ledger.push(result.deltas)
        self.history.append(result)
        return result

    def compute(
        self, requests: Iterable[RequestLike], algorithm: str = "rome", hparams: HParams | None = None,
        refuse_current: bool = True, cache_values: bool = False, checked: bool = False,
        on_phase: PhaseCallback | None = None, previous: Sequence[EditResult] | None = None,
        **overrides: object,
    ) -> EditResult:
        """The edit of ``requests`` on the model as it is now, as data; the weights are
        left exactly as they were. ``checked=True`` takes requests :meth:`prepare` already
        returned. ``on_phase`` hears the phase names as they start. ``previous``: the edits
        the model holds now (default: this Editor's history), whose keys AlphaEdit keeps."""
        started = time.perf_counter()
        hp = hparams if hparams is not None else self.hparams(algorithm, **overrides)
        for layer in hp.layers:
            self.adapter.device(layer)  # in range and resident (not offloaded by a device map)
        self._value_site(hp)
        timer = _Timer(on_phase or self.on_phase)
        if checked:
            batch = list(requests)
            templates = None
        else:
            batch = self._requests(requests)  # the cheap refusals before the templates are sampled
            templates = self._context_templates(hp, timer)
            self._fit_context(batch, templates)  # before the model reads any prompt
            with timer.phase("prepare"):
                batch = self._answered(batch, refuse_current)
        covs = self._covariances(hp, timer)
        templates = templates or self._context_templates(hp, timer)
        cache_ok = cache_values and self.ledger.is_original  # the disk cache holds v* of the original
        result = EditResult(hp.algorithm, hp, batch,
                            value_cache="original" if cache_ok else "edited" if cache_values else "off")
        with self.ledger.scratch(hp.layers):
            if hp.algorithm == "rome":
                self._rome(batch, hp, covs, templates, result, timer, cache_ok)
            else:
                prior = self.history if previous is None else previous
                self._batch(batch, hp, covs, templates, result, timer, cache_ok, prior)
            for layer in hp.layers:
                if not bool(torch.isfinite(self.adapter.weight(layer)).all()):
                    raise NumericalError(f"layer {layer} has NaN/Inf after the update (dtype overflow?)")
        result.seconds = {**timer.seconds, "total": time.perf_counter() - started}
        return result

    def check(self, hp: HParams, requests: Iterable[RequestLike] = (), batch_size: int | None = None
              ) -> list[EditRequest]:
        """Refuse, before any model work, what needs none: layers out of range, offloaded
        or more than the family allows, malformed requests, conflicting ones within a batch
        (``batch_size`` consecutive requests; all of them when None), and prompts that with
        their longest context template and target exceed the context window. Returns the
        requests as :class:`EditRequest`."""
        for layer in hp.layers:
            self.adapter.device(layer)  # in range and resident (not offloaded by a device map)
        self._value_site(hp)
        batch = [request_from(r, f"request {i + 1}") for i, r in enumerate(requests)]
        size = batch_size or max(len(batch), 1)
        for first in range(0, len(batch), size):
            check_conflicts(batch[first : first + size])
        if batch:
            self._fit_context(batch, self._context_templates(hp, _Timer()))
        return batch

    def _fit_context(self, batch: Sequence[EditRequest], templates: Sequence[str]) -> None:
        """Refuse a prompt that, in its longest context template and with its target, would
        not fit the model's context window (the model would fail on it mid-edit)."""
        limit = self.adapter.context_length()
        if not limit:
            return
        tok = self.loaded.tokenizer
        longest = max(templates, key=len)
        for request in batch:
            ids, _ = encode_in_template(tok, longest, request)
            size = len(ids) + len(target_ids(tok, request.target_new)) - 1
            if size > limit:
                raise InvalidRequestError(
                    f"{quote(request.text)} with its longest context template and target is {size} tokens, "
                    f"more than the model's context of {limit}")

    def prepare(self, requests: Iterable[RequestLike], refuse_current: bool = True) -> list[EditRequest]:
        """Validate requests, fill in missing old objects with the model's own answer, and
        refuse targets the model already gives."""
        return self._answered(self._requests(requests), refuse_current)

    @staticmethod
    def _requests(requests: Iterable[RequestLike]) -> list[EditRequest]:
        """Well-formed, at least one, and no two that conflict: checked without the model."""
        batch = [request_from(r, f"request {i + 1}") for i, r in enumerate(requests)]
        if not batch:
            raise InvalidRequestError("no edit requests given")
        check_conflicts(batch)
        return batch

    def _answered(self, batch: list[EditRequest], refuse_current: bool) -> list[EditRequest]:
        """``batch`` with missing old objects read off the model; facts it already answers
        the new way refused (only those without an old object unless ``refuse_current``)."""
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
        """C0 = E[k kᵀ] of ``layer`` under ``hparams``' corpus settings, from the original
        weights (cached in memory and on disk)."""
        self.adapter.check_layer(layer)
        return self._covariances(hparams.replace(layers=(layer,)), _Timer())[layer]

    def known_covariance(self, layer: int, hparams: HParams) -> torch.Tensor | None:
        """C0 of ``layer`` if this Editor has it in memory already (None, without work, if not)."""
        return self._covs.get((layer, *hparams.stats_settings))

    def warm_values(self, requests: Iterable[RequestLike], hparams: HParams,
                    progress: Callable[[int], object] | None = None) -> None:
        """Optimise and cache v* for many facts in shared batches, ahead of applying them
        one chunk at a time (ROME one by one, small MEMIT/EMMET batches), which would
        otherwise run the value optimisation on a handful of prompts per pass. Only on the
        unedited model, whose values the cache holds. ``progress(k)`` hears of every k facts done."""
        if not self.ledger.is_original:
            raise InvalidRequestError("warm_values needs the unedited model (undo or reset first)")
        batch = [request_from(r, f"request {i + 1}") for i, r in enumerate(requests)]
        layer, site = self._value_site(hparams)
        cached_values(self.loaded, batch, self._context_templates(hparams, _Timer()), layer, site, hparams.values,
                      progress=progress)

    def snapshot(self, keys: bool = True) -> dict[str, torch.Tensor]:
        """What is needed to go on editing from here in another process (a lifelong run
        that resumes): the weights of every edited layer as stored (``weight.L``) and, with
        ``keys``, the keys of every edit held, per layer (``keys.L``: AlphaEdit's K_p, the
        only solver that reads them). CPU tensors, for :func:`safetensors.torch.save_file`."""
        tensors = {f"weight.{layer}": self.adapter.weight(layer).detach().cpu().contiguous()
                   for layer in self.ledger.layers}
        for layer in self.ledger.layers if keys else []:
            keys = [u.keys for r in self.history for u in r.updates if u.layer == layer]
            if keys:
                tensors[f"keys.{layer}"] = torch.cat(keys, dim=1).contiguous()
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor], hparams: HParams) -> EditResult:
        """Go on from a :meth:`snapshot` taken on this model's original weights: the weights
        are set bit for bit, and the history becomes one edit that holds the saved keys
        (``hparams``: the settings the saved edits were made with). Unedited model only.
        Undoing it gives the originals back exactly; undoing a later edit gives the saved
        weights back up to the last bit (see :meth:`Ledger.adopt`)."""
        weights = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("weight.")}
        deltas = {d.layer: d for d in self.ledger.adopt(weights)}
        result = EditResult(hparams.algorithm, hparams, [], value_cache="off")
        for layer, delta in deltas.items():
            keys = tensors.get(f"keys.{layer}", torch.zeros(self.adapter.key_size(layer), 0))
            result.updates.append(LayerUpdate(layer, keys, torch.zeros(0, keys.shape[1]), delta))
        self.history = [result]
        return result

    def undo(self) -> EditResult:
        """Revert the last ``apply`` exactly."""
        if not self.history:
            raise InvalidRequestError("nothing to undo")
        result = self.history.pop()
        self.ledger.write([d for r in self.history for d in r.deltas])
        return result

    def reset(self) -> None:
        """Back to the original weights."""
        self.history.clear()
        self.ledger.write([])

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
    def _covariances(self, hp: HParams, timer: _Timer) -> dict[int, torch.Tensor]:
        keys = {layer: (layer, *hp.stats_settings) for layer in hp.layers}
        todo = [layer for layer, key in keys.items() if key not in self._covs]
        if todo:
            with timer.phase("stats"), self.ledger.original():
                found = layer_covariances(self.loaded, todo, hp.stats_corpus, hp.stats_tokens,
                                          getattr(torch, hp.stats_dtype), precision=hp.stats_precision)
            for layer, cov in found.items():  # C0 lives beside the matrix it constrains
                self._covs[keys[layer]] = cov.to(self.adapter.device(layer))
        return {layer: self._covs[key] for layer, key in keys.items()}

    def _context_templates(self, hp: HParams, timer: _Timer) -> list[str]:
        key = (hp.context_templates, hp.seed)
        if key not in self._templates:
            with timer.phase("templates"), self.ledger.original():
                self._templates[key] = context_templates(self.loaded, [list(x) for x in hp.context_templates],
                                                         seed=hp.seed)
        return self._templates[key]

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

    def _values(self, batch: list[EditRequest], templates: list[str], layer: int, site: str, hp: HParams,
                cached: bool, on_step: Callable[[int, int, int], None] | None = None):
        if cached:
            return cached_values(self.loaded, batch, templates, layer, site, hp.values, on_step=on_step)
        return compute_values(self.loaded, batch, templates, layer, site, hp.values, on_step=on_step)

    def _rome(self, batch: list[EditRequest], hp: HParams, covs: dict[int, torch.Tensor], templates: list[str],
              result: EditResult, timer: _Timer, cached: bool) -> None:
        (layer,) = hp.layers
        for number, request in enumerate(batch, start=1):
            with timer.phase("keys"):
                key, plain = compute_keys(self.loaded, [request], templates, layer, mode="mean")
            with timer.phase("values"):
                facts = f"fact {number}/{len(batch)}, " if len(batch) > 1 else ""
                values = self._values([request], templates, layer, "mlp", hp, cached, timer.value_steps(facts))
                cached = False  # the next fact sees the weights this one changes
                result.values_cached += values.cached
            with timer.phase("solve"):  # on the device of the layer, where C0 is
                here = covs[layer].device
                key, plain = key.to(here), plain.to(here)
                constraint = plain[:, 0] if hp.rome_variant == "original" else None
                current = self.adapter.project(layer, (plain if constraint is not None else key))[:, 0]
                residual = values.values[0].to(here, torch.float64) - current.to(here)
                change = Delta.of(self.adapter, layer, rome_update(residual, key[:, 0], covs[layer],
                                                                   constraint_key=constraint))
                change.add_to(self.adapter)  # inside the Editor's scratch block: undone after
            result.updates.append(LayerUpdate(layer, key.cpu(), residual[:, None].cpu(), change))
            result.value_loss_before += values.loss_before.tolist()
            result.value_loss_after += values.loss_after.tolist()

    def _batch(self, batch: list[EditRequest], hp: HParams, covs: dict[int, torch.Tensor], templates: list[str],
               result: EditResult, timer: _Timer, cached: bool, previous: Sequence[EditResult]) -> None:
        """MEMIT, EMMET, AlphaEdit and ENCORE: one batch of v* at the last edited layer, the
        residual spread over the edited layers, each layer solved with what it sees now."""
        z_layer, site = self._value_site(hp)
        at_mlp = site == "mlp"
        with timer.phase("values"):
            values = self._values(batch, templates, z_layer, site, hp, cached, timer.value_steps())
        result.values_cached = values.cached
        targets = values.values.T.to(torch.float64)  # (d, N)
        result.value_loss_before = values.loss_before.tolist()
        result.value_loss_after = values.loss_after.tolist()
        for i, layer in enumerate(hp.layers):
            with timer.phase("keys"):
                keys, _ = compute_keys(self.loaded, batch, templates, layer, mode="half")
                if at_mlp:  # what W produces now for the averaged keys
                    current = self.adapter.project(layer, keys)
                else:  # the residual at the subject's last token of the plain prompt
                    current = layer_outputs(self.loaded, batch, z_layer).to(torch.float64)
            with timer.phase("solve"):
                # On the device of this layer, where C0 is; the residual comes from the last
                # edited layer, which a device map may have put on another GPU.
                here = covs[layer].device
                keys = keys.to(here)
                residuals = (targets.to(here) - current.to(here)) / (len(hp.layers) - i)
                update = self._solve(hp, layer, residuals, keys, covs[layer], len(batch), previous)
                change = Delta.of(self.adapter, layer, update)
                change.add_to(self.adapter)  # the next layer's keys see it; undone after the block
            result.updates.append(LayerUpdate(layer, keys.cpu(), residuals.cpu(), change))

    def _solve(self, hp: HParams, layer: int, residuals: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor,
               facts: int, previous: Sequence[EditResult]) -> torch.Tensor:
        if hp.algorithm == "memit":
            return memit_update(residuals, keys, cov, hp.mom2_update_weight)
        if hp.algorithm == "emmet":
            ridge = hp.ridge if (facts > 1 or hp.ridge_single) else 0.0
            return emmet_update(residuals, keys, cov, ridge)
        if hp.algorithm == "encore":  # pulled back towards W₀ by the total change of earlier edits
            return encore_update(residuals, keys, cov, hp.mom2_update_weight, hp.encore_norm_weight,
                                 self.ledger.drift(layer))
        earlier = [u.keys for r in previous for u in r.updates if u.layer == layer]
        prior = None
        if earlier:
            stacked = torch.cat(earlier, dim=1).to(keys.device, torch.float64)
            prior = stacked @ stacked.T  # K_p K_pᵀ: the keys of every edit the model holds
        return alphaedit_update(residuals, keys, self._projector(layer, hp, cov), prior, hp.alphaedit_l2)

    def _projector(self, layer: int, hp: HParams, cov: torch.Tensor) -> torch.Tensor:
        key = (layer, *hp.stats_settings, hp.nullspace_threshold)
        if key not in self._projectors:
            self._projectors[key] = null_space_projector(cov, hp.nullspace_threshold)
        return self._projectors[key]
