"""Exceptions raised by emmet_core.

Every error that bad user input can trigger derives from :class:`EditError`, so the CLI
and the app can show one readable line instead of a traceback. Raising any of them
guarantees the model's weights were left exactly as they were.
"""

from __future__ import annotations


class EditError(ValueError):
    """Base class: the request could not be carried out; nothing was changed."""


class InvalidRequestError(EditError):
    """A request is malformed (empty subject, subject not in prompt, empty target...)."""


class UnsupportedModelError(EditError):
    """The model family is unknown to the architecture adapter, or the name cannot load."""


class NumericalError(EditError):
    """A solve produced NaN/Inf or met a singular system."""


class StatsCacheError(EditError):
    """A covariance cache file is corrupt or does not match what was asked for."""


def require_finite(tensor, what: str) -> None:
    """Raise :class:`NumericalError` if ``tensor`` holds NaN or Inf."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(f"{what} contains NaN or Inf")
