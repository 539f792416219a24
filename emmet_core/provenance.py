"""What every results file records about the software that produced it."""

from __future__ import annotations

import importlib.metadata as md
import platform


def versions() -> dict[str, str]:
    """Python and library versions."""
    found = {"python": platform.python_version()}
    for name in ("emmet-studio", "torch", "transformers", "safetensors", "gguf"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found
