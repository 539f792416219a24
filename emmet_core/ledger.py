"""The one owner of a model's edited weights: originals kept once, edits as deltas.

An edit is data, a list of :class:`Delta` (one per layer update), each stored in its
weight's own dtype and layout. Adding a delta is then the same floating-point operation
every time it is added, so replaying a list of deltas onto the original weights gives the
edited weights bit for bit, by construction (the ``peft`` way: an update is an object,
merging it is a checked and reversible operation).

The :class:`Ledger` keeps the original of every layer a delta ever touched (taken while
that layer was still original) and knows which deltas the weights hold now. Everything
that changes weights goes through it:

- :meth:`Ledger.push` adds deltas to what is there, after checking they are finite;
- :meth:`Ledger.write` makes the weights exactly original + a list of deltas;
- :meth:`Ledger.scratch` lets work change weights and puts them back afterwards, even on
  error (an edit is computed inside it);
- :meth:`Ledger.original` shows the original weights for the length of a block: the only
  state that caches (C0, context templates, baseline scores, v*) are computed from.

Not thread-safe: whoever shares a model guards its ledger with a lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .adapter import ModelAdapter
from .errors import EditError, NumericalError, require_finite


@dataclass(frozen=True, eq=False)
class Delta:
    """One change of one layer's edited matrix, as the weight stores it (dtype and layout),
    kept on the CPU."""

    layer: int
    change: torch.Tensor
    transposed: bool  # the weight stores Wᵀ (GPT-2's Conv1D), and so does ``change``

    @classmethod
    def of(cls, adapter: ModelAdapter, layer: int, update: torch.Tensor) -> Delta:
        """The delta that adds ``update`` ((d, d_k), any float dtype) to W of ``layer``,
        rounded once to the weight's dtype on the weight's device."""
        weight = adapter.weight(layer)
        transposed = adapter.transposed(layer)
        change = (update.T if transposed else update).to(weight.device, weight.dtype)
        return cls(layer, change.detach().cpu(), transposed)

    @property
    def matrix(self) -> torch.Tensor:
        """The change as a (d, d_k) matrix, output = (W + Δ) k."""
        return self.change.T if self.transposed else self.change

    def add_to(self, adapter: ModelAdapter) -> None:
        """W += Δ in place: the one operation that ever applies a delta."""
        weight = adapter.weight(self.layer)
        with torch.no_grad():
            weight.add_(self.change.to(weight.device))


def layers_of(deltas: Iterable[Delta]) -> list[int]:
    return sorted({d.layer for d in deltas})


class Ledger:
    """The original weights of a model's edited layers, and the deltas it holds now."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self._original: dict[int, torch.Tensor] = {}
        self._applied: list[Delta] = []

    @property
    def applied(self) -> tuple[Delta, ...]:
        """The deltas in the weights now, in the order they were added."""
        return tuple(self._applied)

    @property
    def is_original(self) -> bool:
        return not self._applied

    @property
    def layers(self) -> list[int]:
        """Every layer a delta has touched (whose original is kept)."""
        return sorted(self._original)

    def adopt(self, weights: dict[int, torch.Tensor]) -> list[Delta]:
        """Take ``weights`` (layer -> the weight as stored, e.g. a saved lifelong run) as the
        weights of this still unedited model, set bit for bit. The ledger then holds one
        delta per layer, W − W₀ in the weight's dtype: the originals come back exactly, but
        original + that delta may differ from ``weights`` in the last bit."""
        if self._applied:
            raise EditError("the weights hold edits already: adopt saved weights on the unedited model only")
        for layer, weight in weights.items():
            current = self.adapter.weight(layer)
            if weight.shape != current.shape or weight.dtype != current.dtype:
                raise EditError(f"saved weights of layer {layer} are {tuple(weight.shape)} {weight.dtype}, the "
                                f"model's {tuple(current.shape)} {current.dtype}")
            require_finite(weight, f"the saved weights of layer {layer}")
        self.keep(weights)
        deltas = []
        with torch.no_grad():
            for layer, weight in sorted(weights.items()):
                current = self.adapter.weight(layer)
                change = weight.to(current.device) - current
                deltas.append(Delta(layer, change.detach().cpu(), self.adapter.transposed(layer)))
                current.copy_(weight)
        self._applied = deltas
        return deltas

    def drift(self, layer: int) -> torch.Tensor | None:
        """W − W₀ of ``layer`` as a (d, d_k) float64 matrix: how far the weights are now from
        the original (None while no delta has touched the layer)."""
        if layer not in self._original:
            return None
        current = self.adapter.weight(layer).detach().to(torch.float64)
        change = current - self._original[layer].to(current.device, torch.float64)
        return change.T if self.adapter.transposed(layer) else change

    def keep(self, layers: Iterable[int]) -> None:
        """Remember the original weights of ``layers`` (a no-op for layers already kept;
        a layer no delta has touched yet is still original)."""
        for layer in layers:
            if layer not in self._original:
                self._original[layer] = self.adapter.weight(layer).detach().clone()

    def push(self, deltas: Sequence[Delta]) -> None:
        """Add ``deltas`` to the weights, in order. All are checked before any is added;
        if the sum overflows the weight's dtype the weights go back to what they were."""
        for delta in deltas:
            self.adapter.device(delta.layer)  # in range and resident
            require_finite(delta.change, f"the update of layer {delta.layer}")
        self.keep(layers_of(deltas))
        for delta in deltas:
            delta.add_to(self.adapter)
        self._applied.extend(deltas)
        broken = [layer for layer in layers_of(deltas) if not bool(torch.isfinite(self.adapter.weight(layer)).all())]
        if broken:
            self.write(self._applied[: len(self._applied) - len(deltas)])
            raise NumericalError(f"layer {broken[0]} has NaN/Inf after the update (dtype overflow?)")

    def write(self, deltas: Sequence[Delta]) -> None:
        """Make the weights exactly original + ``deltas`` (replayed in order)."""
        if list(deltas[: len(self._applied)]) == self._applied and len(deltas) >= len(self._applied):
            self.push(deltas[len(self._applied):])  # what is there already is a prefix: add the rest
            return
        with torch.no_grad():
            for layer, weight in self._original.items():
                self.adapter.weight(layer).copy_(weight)
        self._applied = []
        self.push(deltas)

    @contextmanager
    def scratch(self, layers: Iterable[int]) -> Iterator[None]:
        """Let the block change the weights of ``layers``; they are put back afterwards,
        bit for bit, whatever happens inside."""
        layers = sorted(set(layers))
        self.keep(layers)
        saved = {layer: self.adapter.weight(layer).detach().clone() for layer in layers}
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, weight in saved.items():
                    self.adapter.weight(layer).copy_(weight)

    @contextmanager
    def original(self) -> Iterator[None]:
        """The original weights for the length of the block, then the edits again."""
        if not self._applied:
            yield
            return
        touched = layers_of(self._applied)
        with self.scratch(touched):
            with torch.no_grad():
                for layer in touched:
                    self.adapter.weight(layer).copy_(self._original[layer])
            yield
