"""How numbers read on every page: one rule per kind of number, so a probability that
reads 2.4e-06 on one page never reads 0% on another, and a missing value is a dash."""

from __future__ import annotations

import math
from collections.abc import Callable

MISSING = "–"


def format_probability(p: float) -> str:
    """At least 0.1 %: a percent with one decimal; below it, scientific notation with two
    significant digits (2.4e-06), so a tiny probability never reads as 0 %."""
    if p == 0:
        return "0"
    return f"{p:.1%}" if p >= 0.001 else f"{p:.1e}"


_KINDS: dict[str, Callable[[float], str]] = {
    "prob": format_probability,  # a probability in [0, 1]
    "share": lambda x: f"{x:.0%}",  # a share of prompts in [0, 1] (one fact's ES, PS, NS): k of n
    "score": lambda x: f"{x:.1f}",  # a score already ×100 (ES, PS, NS, S of a run)
    "percent": lambda x: f"{x:.0f}%",  # a number already in percent
    "bits": lambda x: f"{x:.2f} bits",  # generation entropy
    "norm": lambda x: f"{x:.3g}",  # ‖Δ‖ and other magnitudes
    "seconds": lambda x: f"{x:.1f} s",
}


def format_value(x: float | None, kind: str = "prob") -> str:
    """``x`` as text by ``kind`` (prob, share, score, percent, bits, norm, seconds);
    None and NaN read as a dash."""
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(_KINDS)}")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return _KINDS[kind](float(x))
