"""The anatomy of an edit, for pictures: keys, residuals, the spectrum of Δ, how well
Ŵk = v holds before and after, and the spectrum of C0 (REFERENCE §1).

Everything is computed from what the Editor recorded (:class:`editor.LayerUpdate`) and
from C0, never from live weights, so it is safe to call from any session at any time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..editor import EditResult


@dataclass
class UpdatePicture:
    """One layer update: K (d_k, N), R (d, N) and Δ (d, d_k), and what they imply."""

    label: str
    layer: int
    keys: torch.Tensor
    residuals: torch.Tensor
    delta: torch.Tensor
    singular_values: torch.Tensor  # of Δ, descending
    rank: int  # numerical rank of Δ
    residual_before: torch.Tensor  # (N,) ‖W k − v‖ = ‖r‖: what this layer had to add
    residual_after: torch.Tensor  # (N,) ‖(W + Δ) k − v‖ = ‖Δ k − r‖

    @property
    def n_facts(self) -> int:
        return self.keys.shape[1]


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-4) -> int:
    """Singular values above ``rtol`` × the largest (Δ is stored in float32, so values
    far below that are rounding, not directions)."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


def picture(label: str, layer: int, keys: torch.Tensor, residuals: torch.Tensor,
            delta: torch.Tensor) -> UpdatePicture:
    keys64, residuals64, delta64 = (t.detach().to("cpu", torch.float64) for t in (keys, residuals, delta))
    values = torch.linalg.svdvals(delta64)
    after = (delta64 @ keys64 - residuals64).norm(dim=0)
    return UpdatePicture(label, layer, keys64, residuals64, delta64, values, numerical_rank(values),
                         residuals64.norm(dim=0), after)


def pictures(results: list[EditResult]) -> list[UpdatePicture]:
    """One picture per layer update of ``results`` (ROME: one per fact; MEMIT: one per
    layer; EMMET: one), labelled for a chooser."""
    out = []
    updates = [(result, update) for result in results for update in result.updates]
    for index, (result, update) in enumerate(updates, start=1):
        what = f"{result.algorithm.upper()} · layer {update.layer}"
        if len(updates) > 1:
            what += f" · update {index} of {len(updates)}"
        out.append(picture(what, update.layer, update.keys, update.residuals, update.delta))
    return out


def spectrum(covariance: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of C0 (symmetric positive semi-definite), descending."""
    cov = covariance.detach().to(torch.float64)  # on its own device: d_k = 16,384 is slow on a CPU
    return torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0).cpu()
