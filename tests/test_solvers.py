"""The closed forms on random matrices, no model involved."""

from __future__ import annotations

import pytest
import torch

from emmet_core.errors import NumericalError
from emmet_core.solvers import (
    alphaedit_update,
    emmet_update,
    encore_update,
    memit_update,
    null_space_projector,
    rome_update,
)


def problem(d: int = 12, d_k: int = 20, n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randn(200, d_k, generator=gen, dtype=torch.float64)
    cov = samples.T @ samples / 200  # well-conditioned SPD "E[k kᵀ]"
    keys = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    residuals = torch.randn(d, n, generator=gen, dtype=torch.float64)
    return residuals, keys, cov


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_emmet_satisfies_equality_constraints_without_ridge():
    residuals, keys, cov = problem()
    delta = emmet_update(residuals, keys, cov, ridge=0.0)
    assert delta.shape == (12, 20)
    assert rel(delta @ keys, residuals) < 1e-5


def test_emmet_ridge_relaxes_the_constraints():
    residuals, keys, cov = problem()
    exact = emmet_update(residuals, keys, cov, ridge=0.0)
    ridged = emmet_update(residuals, keys, cov, ridge=10.0)
    assert rel(ridged @ keys, residuals) > 1e-3  # no longer exact...
    assert ridged.norm() < exact.norm()  # ...and smaller


def test_rome_maps_key_to_value():
    residuals, keys, cov = problem(n=1)
    delta = rome_update(residuals[:, 0], keys[:, 0], cov)
    assert rel(delta @ keys[:, 0], residuals[:, 0]) < 1e-5
    assert torch.linalg.matrix_rank(delta) == 1


def test_rome_equals_emmet_for_one_fact():
    residuals, keys, cov = problem(n=1)
    rome = rome_update(residuals[:, 0], keys[:, 0], cov)
    emmet = emmet_update(residuals, keys, cov, ridge=0.0)
    assert rel(rome, emmet) < 1e-10


def test_original_rome_enforces_the_plain_prompt_key():
    residuals, keys, cov = problem(n=2)
    mean_key, plain_key = keys[:, 0], keys[:, 1]
    delta = rome_update(residuals[:, 0], mean_key, cov, constraint_key=plain_key)
    assert rel(delta @ plain_key, residuals[:, 0]) < 1e-5
    assert rel(delta @ mean_key, residuals[:, 0]) > 1e-3


def test_memit_zeroes_the_gradient_of_its_objective():
    residuals, keys, cov = problem(n=8)
    lam = 3.0
    delta = memit_update(residuals, keys, cov, cov_weight=lam).requires_grad_(True)
    objective = lam * torch.trace(delta @ cov @ delta.T) + ((delta @ keys - residuals) ** 2).sum()
    (grad,) = torch.autograd.grad(objective, delta)
    assert float(grad.norm()) < 1e-8 * float(residuals.norm() * keys.norm())
    # and it is a true minimum: any perturbation increases the objective
    with torch.no_grad():
        bumped = delta + 1e-3 * torch.randn_like(delta)
        bumped_obj = lam * torch.trace(bumped @ cov @ bumped.T) + ((bumped @ keys - residuals) ** 2).sum()
    assert bumped_obj > objective


def test_memit_fits_keys_better_as_lambda_shrinks():
    residuals, keys, cov = problem(n=4)
    errors = [rel(memit_update(residuals, keys, cov, lam) @ keys, residuals) for lam in (100.0, 1.0, 1e-4)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_singular_covariance_is_refused():
    residuals, keys, cov = problem()
    cov[:, 3] = 0.0
    cov[3, :] = 0.0
    with pytest.raises(NumericalError, match="singular"):
        emmet_update(residuals, keys, cov)


def test_nan_inputs_are_refused():
    residuals, keys, cov = problem()
    keys[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        emmet_update(residuals, keys, cov)
    with pytest.raises(NumericalError):
        memit_update(residuals, keys, cov, 1.0)


def test_duplicate_keys_need_the_ridge():
    residuals, keys, cov = problem(n=3)
    keys[:, 2] = keys[:, 1]  # two facts with the same key and different values
    with pytest.raises(NumericalError):
        emmet_update(residuals, keys, cov, ridge=0.0)
    delta = emmet_update(residuals, keys, cov, ridge=1.0)
    assert torch.isfinite(delta).all()


def low_rank_problem(d: int = 12, d_k: int = 20, n: int = 5, rank: int = 14, seed: int = 1):
    """C0 from keys that live (mostly) in a rank-14 subspace: the rest is AlphaEdit's null space."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_k, d_k, generator=gen, dtype=torch.float64))[0]
    scales = torch.cat([torch.linspace(5.0, 1.0, rank), torch.full((d_k - rank,), 1e-4)]).to(torch.float64)
    cov = basis @ torch.diag(scales) @ basis.T
    keys = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    residuals = torch.randn(d, n, generator=gen, dtype=torch.float64)
    return residuals, keys, cov, basis[:, :rank]


def test_alphaedit_leaves_the_kept_subspace_unchanged():
    residuals, keys, cov, kept = low_rank_problem()
    projector = null_space_projector(cov, threshold=1e-2)
    assert torch.allclose(projector @ projector, projector, atol=1e-10)  # a projection
    assert round(float(projector.trace())) == 20 - 14
    delta = alphaedit_update(residuals, keys, projector, l2=1e-6)
    assert float((delta @ kept).norm()) < 1e-8 * float(delta.norm())  # Δ k = 0 for every kept direction
    assert torch.allclose(delta @ projector, delta, atol=1e-10)
    # Within the null space the edit is made: Δ (P K) reproduces R (P K)-wise, up to the small ridge.
    fitted = delta @ keys
    best = residuals @ torch.linalg.pinv(projector @ keys) @ (projector @ keys)
    assert rel(fitted, best) < 1e-3


def test_alphaedit_counts_earlier_edits_and_its_ridge_shrinks_the_update():
    residuals, keys, cov, _ = low_rank_problem()
    projector = null_space_projector(cov, threshold=1e-2)
    earlier = torch.randn(20, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    free = alphaedit_update(residuals, keys, projector, l2=1.0)
    held = alphaedit_update(residuals, keys, projector, prior=earlier @ earlier.T, l2=1.0)
    moved = [float((update @ projector @ earlier).norm()) for update in (held, free)]
    assert moved[0] < moved[1]  # the keys of earlier edits move less
    assert float(alphaedit_update(residuals, keys, projector, l2=100.0).norm()) < float(free.norm())
    with pytest.raises(NumericalError, match="null-space threshold"):
        null_space_projector(cov, threshold=1e-6)


def test_encore_zeroes_the_gradient_of_its_objective():
    residuals, keys, cov = problem(n=6)
    lam, mu = 2.0, 3.0
    accumulated = torch.randn(12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    delta = encore_update(residuals, keys, cov, lam, mu, accumulated).requires_grad_(True)
    objective = (lam * torch.trace(delta @ cov @ delta.T) + ((delta @ keys - residuals) ** 2).sum()
                 + mu * ((accumulated + delta) ** 2).sum())
    (grad,) = torch.autograd.grad(objective, delta)
    assert float(grad.norm()) < 1e-8 * float(residuals.norm() * keys.norm() + accumulated.norm())
    # μ = 0 is MEMIT; a larger μ pulls the total change D + Δ towards zero
    memit = memit_update(residuals, keys, cov, lam)
    assert rel(encore_update(residuals, keys, cov, lam, 0.0, accumulated), memit) < 1e-10
    totals = [float((accumulated + encore_update(residuals, keys, cov, lam, m, accumulated)).norm())
              for m in (0.0, 1.0, 100.0)]
    assert totals[0] > totals[1] > totals[2]
