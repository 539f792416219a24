"""What every on-disk cache here does: name an entry by a digest of what it depends on,
write it so that a reader never sees half a file, and check on reading that its bytes are
the ones written (a file that fails is treated as missing and recomputed, never used)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def digest(payload: object) -> str:
    """A short, stable name for a JSON-serialisable description of an entry."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _text_sha(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_json(path: Path, data: object) -> None:
    """``data`` as JSON with the sha256 of its canonical text beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    envelope = {"sha256": _text_sha(data), "data": data}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(envelope, ensure_ascii=False), encoding="utf-8"))


def read_json(path: Path) -> object | None:
    """What :func:`write_json` wrote, or None if the file is missing, unreadable, torn,
    not ours, or its content no longer matches its checksum."""
    try:
        envelope = json.loads(path.read_text(encoding="utf-8"))
        data = envelope["data"]
        return data if envelope["sha256"] == _text_sha(data) else None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def tensors_sha(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (CPU tensors)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()
