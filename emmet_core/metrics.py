"""CounterFact and zsRE metrics (REFERENCE §7) as pure functions on numbers and text.

Each prompt is scored by the mean per-token NLL of ``prompt + " " + target`` for the new
and the true object; the metrics below only compare and average those numbers, so they
are tested on hand-made inputs with known answers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from statistics import fmean

_WORD = re.compile(r"\w+|[^\w\s]")


def success(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """Share of prompts where the new object is more likely (ES, PS)."""
    return fmean(n < t for n, t in zip(nll_new, nll_true, strict=True))


def kept(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """Share of neighbourhood prompts that still prefer the true object (NS)."""
    return fmean(t < n for n, t in zip(nll_new, nll_true, strict=True))


def magnitude(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """Mean of p_new − p_true with p = exp(−NLL) (EM, PM); NM is the negation."""
    return fmean(math.exp(-n) - math.exp(-t) for n, t in zip(nll_new, nll_true, strict=True))


def ngram_entropy(text: str, n: int) -> float:
    """Shannon entropy in bits of the n-gram frequency distribution over word tokens."""
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def generation_entropy(text: str) -> float:
    """GE of one text: H2/3 + 2·H3/3 (drops when an edit makes the model repeat itself)."""
    return ngram_entropy(text, 2) / 3 + 2 * ngram_entropy(text, 3) / 3


def harmonic_mean(*values: float) -> float:
    """S: harmonic mean of ES, PS, NS; zero if any is zero."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def token_accuracy(predicted: Sequence[int], wanted: Sequence[int]) -> float:
    """zsRE: share of target tokens that are the argmax under teacher forcing."""
    return fmean(p == w for p, w in zip(predicted, wanted, strict=True))


def mean_delta_norm(lines: list[dict]) -> float | None:
    """Mean over chunks of ‖Δ‖_F, all edited layers together, from records.jsonl lines."""
    per_chunk = {d["chunk"]: sum(v * v for v in d["delta_norms"].values()) ** 0.5 for d in lines if d["delta_norms"]}
    return sum(per_chunk.values()) / len(per_chunk) if per_chunk else None
