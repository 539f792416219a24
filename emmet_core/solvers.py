"""The closed-form updates of ROME, MEMIT and EMMET as pure functions on tensors.

Shapes: keys ``K`` are (d_k, N), one averaged key per fact; residuals ``R = V - W0 K``
are (d, N); the covariance ``C0 = E[k kᵀ]`` is (d_k, d_k). Every update returned is
(d, d_k) in float64; the caller casts it to the weight's dtype when applying it.
All systems are solved with Cholesky / LU solves, never explicit inverses.
"""

from __future__ import annotations

import warnings

import torch

from .errors import NumericalError, require_finite


def _f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().to(torch.float64) for t in tensors]


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor, name: str) -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for a symmetric positive (semi)definite matrix.

    Cholesky first. If that fails, the matrix is numerically singular or indefinite:
    a singular one is refused (regularise with a ridge or more covariance tokens instead
    of a silent pseudo-inverse); a merely indefinite one is solved by LU with a warning.
    """
    require_finite(matrix, name)
    require_finite(rhs, f"right-hand side for {name}")
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    eigenvalues = torch.linalg.eigvalsh(matrix).abs()
    tolerance = eigenvalues.max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps * 1e3
    rank = int((eigenvalues > tolerance).sum())
    if rank < matrix.shape[0]:
        raise NumericalError(
            f"{name} is singular (numerical rank {rank} of {matrix.shape[0]}); "
            "add a ridge or use more covariance tokens"
        )
    warnings.warn(f"{name} is not positive definite; used an LU solve", stacklevel=3)
    return torch.linalg.solve(matrix, rhs)


def rome_update(
    residual: torch.Tensor,
    key: torch.Tensor,
    cov: torch.Tensor,
    constraint_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's rank-one update Δ = r (C⁻¹k)ᵀ / (k_cᵀ C⁻¹ k).

    ``residual`` (d,) is ``v* - W0 k_c``; ``key`` (d_k,) is the averaged key k̄.
    ``constraint_key`` is the key the equality is imposed on: None means k̄ itself
    (r-ROME, the default); the original ROME passes the plain-prompt key k_p, and its
    update explodes when k_pᵀ C⁻¹ k̄ is small.
    """
    residual, key, cov = _f64(residual, key, cov)
    k_c = key if constraint_key is None else constraint_key.detach().to(torch.float64)
    direction = solve_spd(cov, key[:, None], "C0")[:, 0]  # C⁻¹ k̄
    denominator = k_c @ direction
    if not torch.isfinite(denominator) or denominator.abs() < 1e-12:
        raise NumericalError(f"ROME denominator kᵀC⁻¹k = {float(denominator):.3g} is degenerate")
    update = torch.outer(residual, direction) / denominator
    require_finite(update, "ROME update")
    return update


def emmet_update(
    residuals: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, ridge: float = 0.0
) -> torch.Tensor:
    """EMMET: Δ = R (Kᵀ C⁻¹ K + ρ I)⁻¹ Kᵀ C⁻¹, equality constraints on a batch.

    With ρ = 0 the edited matrix maps every key exactly to its value; ρ > 0 keeps large,
    nearly collinear batches stable. For N = 1 and ρ = 0 this is ROME.
    """
    residuals, keys, cov = _f64(residuals, keys, cov)
    cinv_k = solve_spd(cov, keys, "C0")  # C⁻¹ K, (d_k, N)
    gram = keys.T @ cinv_k  # Kᵀ C⁻¹ K, (N, N)
    gram = 0.5 * (gram + gram.T) + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    # Δ = R A⁻¹ (C⁻¹K)ᵀ with A symmetric: solve A X = Rᵀ, then Δ = Xᵀ (C⁻¹K)ᵀ.
    coeffs = solve_spd(gram, residuals.T, "Kᵀ C⁻¹ K + ρI")  # (N, d)
    update = coeffs.T @ cinv_k.T
    require_finite(update, "EMMET update")
    return update


def memit_update(
    residuals: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, cov_weight: float
) -> torch.Tensor:
    """MEMIT: Δ = R Kᵀ (m C0 + K Kᵀ)⁻¹, least squares on the batch.

    Minimises m·tr(Δ C0 Δᵀ) + ‖Δ K − R‖²: the edited keys are fitted, not enforced.
    ``cov_weight`` is m (``mom2_update_weight``; the MEMIT paper's λ).
    """
    residuals, keys, cov = _f64(residuals, keys, cov)
    system = cov_weight * cov + keys @ keys.T
    system = 0.5 * (system + system.T)
    # Δ A = R Kᵀ with A symmetric  <=>  A Δᵀ = K Rᵀ.
    update = solve_spd(system, keys @ residuals.T, "m C0 + K Kᵀ").T
    require_finite(update, "MEMIT update")
    return update


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P = Û Ûᵀ over the eigenvectors of C0 whose eigenvalues are below
    ``threshold``: the directions the preserved keys (almost) never take. An update Δ
    with Δ = Δ P leaves every key in the kept subspace unchanged, Δ k = 0."""
    cov = cov.detach().to(torch.float64)
    require_finite(cov, "C0")
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (cov + cov.T))
    basis = eigenvectors[:, eigenvalues < threshold]
    if basis.shape[1] == 0:
        raise NumericalError(
            f"no eigenvalue of C0 is below the null-space threshold {threshold:g} (smallest "
            f"{float(eigenvalues[0]):.3g}): the projection would forbid every update; raise the threshold"
        )
    return basis @ basis.T


def alphaedit_update(
    residuals: torch.Tensor, keys: torch.Tensor, projector: torch.Tensor, prior: torch.Tensor | None = None,
    l2: float = 10.0,
) -> torch.Tensor:
    """AlphaEdit: Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹.

    ``projector`` is :func:`null_space_projector`'s P, ``prior`` the sum K_p K_pᵀ of the
    keys of every earlier edit (None: none yet), ``l2`` the α of the reference code (the
    paper writes I). Solved transposed, (P (K₁K₁ᵀ + K_pK_pᵀ) + α I) Δᵀ = P K₁ Rᵀ, whose
    solution lies in the range of P, so Δ P = Δ: preserved keys stay where they were.
    """
    residuals, keys, projector = _f64(residuals, keys, projector)
    gram = keys @ keys.T
    if prior is not None:
        gram = gram + prior.detach().to(torch.float64)
    system = projector @ gram + l2 * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    require_finite(system, "P (K Kᵀ + K_p K_pᵀ) + α I")
    update = torch.linalg.solve(system, projector @ keys @ residuals.T).T  # not symmetric: an LU solve
    require_finite(update, "AlphaEdit update")
    return update


def encore_update(
    residuals: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, cov_weight: float, norm_weight: float,
    accumulated: torch.Tensor | None = None,
) -> torch.Tensor:
    """ENCORE's solve: MEMIT's objective with a Frobenius-norm constraint on the total
    change of the matrix since its original W₀,

        min_Δ  m tr(Δ C0 Δᵀ) + ‖Δ K − R‖² + μ ‖D + Δ‖²_F,   D = W − W₀ (earlier edits),

    so Δ = (R Kᵀ − μ D)(m C0 + K Kᵀ + μ I)⁻¹: every edit also pulls the matrix back towards
    W₀, and the accumulated norm stops growing without bound. μ = 0 is MEMIT.
    """
    residuals, keys, cov = _f64(residuals, keys, cov)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    system = cov_weight * cov + keys @ keys.T + norm_weight * eye
    system = 0.5 * (system + system.T)
    rhs = keys @ residuals.T  # (d_k, d): the transposed right-hand side
    if accumulated is not None and norm_weight:
        rhs = rhs - norm_weight * accumulated.detach().to(torch.float64).T
    update = solve_spd(system, rhs, "m C0 + K Kᵀ + μ I").T
    require_finite(update, "ENCORE update")
    return update
