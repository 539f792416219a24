"""Hyper-parameters and the presets shipped in ``emmet_core/presets/*.yaml``.

A preset file holds one section per algorithm for one model. Models without a preset
get :func:`generic_hparams`, a measured-nothing fallback that says so in a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from importlib import resources

import yaml

from .errors import InvalidRequestError
from .precision import PRECISIONS
from .values import ValueConfig

log = logging.getLogger(__name__)

ALGORITHMS = ("rome", "memit", "emmet", "alphaedit", "encore")
# How each editor is written for people (the app, figures, tables).
EDITOR_NAMES = {"rome": "ROME", "memit": "MEMIT", "emmet": "EMMET", "alphaedit": "AlphaEdit", "encore": "ENCORE"}

# Preset file per model; hub ids map by their lower-cased last path component.
_PRESET_FILES = {
    "smollm2-135m": "smollm2-135m.yaml",
    "gemma3-270m": "gemma3-270m.yaml",
    "gpt2-xl": "gpt2-xl.yaml",
    "gpt-j-6b": "gpt-j-6b.yaml",
    "llama-2-7b": "llama-2-7b.yaml",
    "llama-2-7b-hf": "llama-2-7b.yaml",
}


@dataclass(frozen=True)
class HParams:
    """Everything that determines an edit, recorded with every result."""

    algorithm: str
    layers: tuple[int, ...]
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_update_weight: float = 1.0  # m: MEMIT's λ; EMMET's ridge is m·emmet_lambda
    emmet_lambda: float = 0.1
    ridge_single: bool = False  # add EMMET's ridge also when N = 1
    nullspace_threshold: float = 2e-2  # AlphaEdit: C0's eigenvalues below it span the null space
    alphaedit_l2: float = 10.0  # AlphaEdit: α of (P (K Kᵀ + K_p K_pᵀ) + α I)
    encore_norm_weight: float = 1.0  # ENCORE: μ of the Frobenius-norm constraint on W − W₀
    value_early_stop: str = "loss"  # or "most_probable" (ENCORE's MPES), for every editor
    value_stop_patience: int = 0  # most_probable: steps a fact goes on once its targets lead
    rome_variant: str = "rebuilt"  # "rebuilt" (r-ROME, k̄ everywhere) or "original"
    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)  # (tokens, count)
    value_precision: str = "float32"  # "tf32" (CUDA) or "bfloat16" (autocast, ≈2x on AMX CPUs): precision.py
    value_rows_per_pass: int | None = None  # prompt rows per value pass; None: 128 on CPU, free memory on CUDA
    seed: int = 0
    stats_corpus: str = "wiki-offline"
    stats_tokens: int = 100_000
    stats_dtype: str = "float64"  # accumulation of C0
    stats_precision: str = "float32"  # the C0 forward: "tf32" or "bfloat16" where allowed (precision.py)
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise InvalidRequestError(
                f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        for name, (kind, allowed) in _CHECKS.items():
            value = getattr(self, name)
            if not _is(kind, value) or not allowed(value):
                raise InvalidRequestError(f"{name} must be {_WANTED[name]}, not {value!r}")
        layers = _int_list(self.layers, "layers")
        if not layers:
            raise InvalidRequestError("no layers to edit")
        if self.algorithm == "rome" and len(set(layers)) != 1:
            raise InvalidRequestError(f"ROME edits exactly one layer, got {sorted(set(layers))}")
        recipe = _int_list(self.context_templates, "context_templates", pairs=True)
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "context_templates", tuple(tuple(pair) for pair in recipe))

    @property
    def values(self) -> ValueConfig:
        return ValueConfig(self.v_num_grad_steps, self.v_lr, self.v_weight_decay,
                           self.clamp_norm_factor, self.kl_factor, seed=self.seed,
                           rows_per_pass=self.value_rows_per_pass, precision=self.value_precision,
                           early_stop=self.value_early_stop, stop_patience=self.value_stop_patience)

    @property
    def stats_settings(self) -> tuple[str, int, str, str]:
        """Everything besides model and layer that C0 depends on: corpus, tokens,
        accumulation dtype and forward precision (the key of every C0 cache)."""
        return self.stats_corpus, self.stats_tokens, self.stats_dtype, self.stats_precision

    @property
    def ridge(self) -> float:
        """EMMET's effective ridge ρ = m·λ (REFERENCE §1)."""
        return self.mom2_update_weight * self.emmet_lambda

    def replace(self, **changes: object) -> HParams:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidRequestError(f"unknown hyper-parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["context_templates"] = [list(x) for x in self.context_templates]
        return data


def _is(kind: type | tuple, value: object) -> bool:
    """Type check that does not take True for the number 1."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _int_list(value: object, name: str, pairs: bool = False) -> list:
    """``layers`` (ints ≥ 0) or ``context_templates`` (pairs of ints ≥ 1), checked."""
    wanted = "a list of [tokens, count] pairs of whole numbers ≥ 1" if pairs else "a list of layer numbers"
    if not isinstance(value, list | tuple):
        raise InvalidRequestError(f"{name} must be {wanted}, not {value!r}")
    out = []
    for item in value:
        parts = list(item) if pairs and isinstance(item, list | tuple) else [item]
        if (pairs and len(parts) != 2) or not all(_is(int, x) and x >= (1 if pairs else 0) for x in parts):
            raise InvalidRequestError(f"{name} must be {wanted}, not {value!r}")
        out.append(parts if pairs else parts[0])
    return out


# Field -> (type, allowed values) and the words for an error; layers/context_templates apart.
_CHECKS = {
    "v_num_grad_steps": (int, lambda v: v >= 1), "v_lr": (float, lambda v: v > 0),
    "v_weight_decay": (float, lambda v: v >= 0), "clamp_norm_factor": (float, lambda v: v > 0),
    "kl_factor": (float, lambda v: v >= 0), "mom2_update_weight": (float, lambda v: v >= 0),
    "emmet_lambda": (float, lambda v: v >= 0), "ridge_single": (bool, lambda v: True),
    "nullspace_threshold": (float, lambda v: v > 0), "alphaedit_l2": (float, lambda v: v > 0),
    "encore_norm_weight": (float, lambda v: v >= 0),
    "value_early_stop": (str, lambda v: v in ("loss", "most_probable")),
    "value_stop_patience": (int, lambda v: v >= 0),
    "rome_variant": (str, lambda v: v in ("rebuilt", "original")),
    "value_precision": (str, lambda v: v in PRECISIONS), "stats_precision": (str, lambda v: v in PRECISIONS),
    "value_rows_per_pass": ((int, type(None)), lambda v: v is None or v >= 1), "seed": (int, lambda v: True),
    "stats_corpus": (str, lambda v: bool(v.strip())), "stats_tokens": (int, lambda v: v >= 1),
    "stats_dtype": (str, lambda v: v in ("float32", "float64")),
}
_WANTED = {
    "v_num_grad_steps": "a whole number ≥ 1", "v_lr": "a number > 0", "v_weight_decay": "a number ≥ 0",
    "clamp_norm_factor": "a number > 0", "kl_factor": "a number ≥ 0", "mom2_update_weight": "a number ≥ 0",
    "emmet_lambda": "a number ≥ 0", "ridge_single": "true or false", "rome_variant": "rebuilt or original",
    "nullspace_threshold": "a number > 0", "alphaedit_l2": "a number > 0", "encore_norm_weight": "a number ≥ 0",
    "value_early_stop": "loss or most_probable", "value_stop_patience": "a whole number ≥ 0",
    "value_precision": " or ".join(PRECISIONS), "stats_precision": " or ".join(PRECISIONS),
    "value_rows_per_pass": "a whole number ≥ 1 (or unset: sized automatically)", "seed": "a whole number",
    "stats_corpus": "wiki-offline, a file or hf:NAME", "stats_tokens": "a whole number ≥ 1",
    "stats_dtype": "float32 or float64",
}


def preset_name(model_name: str) -> str | None:
    key = model_name.rstrip("/").split("/")[-1].lower()
    return _PRESET_FILES.get(key)


def load_preset(model_name: str, algorithm: str, num_layers: int | None = None) -> HParams:
    """The shipped preset for (model, algorithm), else a generic fallback."""
    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise InvalidRequestError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    file = preset_name(model_name)
    if file is None:
        if num_layers is None:
            raise InvalidRequestError(f"no preset for {model_name!r}; pass layers explicitly")
        log.warning("no preset for %s; using generic hyper-parameters (not tuned)", model_name)
        return generic_hparams(algorithm, num_layers)
    data = yaml.safe_load(resources.files("emmet_core").joinpath("presets", file).read_text())
    section = dict(data.get("defaults", {}))
    section.update(data[algorithm])
    return HParams(algorithm=algorithm, **section)


def generic_hparams(algorithm: str, num_layers: int) -> HParams:
    """Early-middle layers hold most factual associations in decoder LMs (ROME §2)."""
    last = max(0, round(num_layers * 0.2))
    spread = algorithm in ("memit", "alphaedit", "encore")  # one residual spread over several layers
    layers = tuple(range(max(0, last - 4), last + 1)) if spread else (last,)
    recipe = ((5, 10), (10, 10)) if algorithm == "rome" else ((10, 5),)
    clamp = 4.0 if algorithm == "rome" else 0.75
    early = "most_probable" if algorithm == "encore" else "loss"
    return HParams(algorithm=algorithm, layers=layers, context_templates=recipe, clamp_norm_factor=clamp,
                   value_early_stop=early, notes="generic fallback, not tuned for this model")


def parse_layers(text: str) -> tuple[int, ...]:
    """Layers as people type them: ``4``, ``2-6``, ``2,4,6``, ``3 4 5`` or ``2-4, 7``."""
    layers: list[int] = []
    try:
        for part in re.split(r"[,\s]+", re.sub(r"\s*-\s*", "-", text.strip())):
            if not part:
                continue
            if "-" in part[1:]:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError
                layers.extend(range(first, last + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise InvalidRequestError(f"layers {text!r}: write numbers like 4, 2-6 or 2,4,6") from None
    if not layers:
        raise InvalidRequestError("no layers given: write numbers like 4, 2-6 or 2,4,6")
    return tuple(sorted(set(layers)))
