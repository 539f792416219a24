"""What every results file records about the software that produced it."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent


def versions() -> dict[str, str]:
    """Python and library versions, and the source revision of emmet_core when it runs
    from a git checkout (``+dirty`` if its files differ from that commit)."""
    found = {"python": platform.python_version()}
    for name in ("emmet-studio", "torch", "transformers", "safetensors", "gguf"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    revision = source_revision()
    if revision:
        found["emmet-studio-git"] = revision
    return found


def source_revision() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding emmet_core, or None outside one."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
