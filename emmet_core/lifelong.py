"""What a long sequence of edits does to a model, measured at checkpoints.

A lifelong run applies batch after batch without ever restoring the weights. At each
checkpoint (and once before the first edit) :func:`measure` records:

- retention: ES/PS/NS of the facts edited so far, on a fixed sample of the run;
- the newest batch's scores (from the run's own after-edit scores);
- held-out facts the run never edits: do their prompts still prefer their own object
  (``kept``), and their neighbourhoods (``NS``);
- generation entropy of seeded samples on the held-out facts' prompts;
- perplexity of held-out text: documents of the covariance corpus that C0 never read;
- ‖W − W₀‖ of each edited matrix (from the ledger) beside ‖W₀‖;
- the continuation of one fixed prompt, so the collapse (or its absence) reads in words.

Everything measured is fixed at the start (:class:`Watch`), so the checkpoints of one run,
and of runs of different editors on the same facts, are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import fmean

import torch

from . import metrics
from .data import EvalRecord
from .editor import Editor
from .evaluate import generation_texts, score_records, summarise
from .models import LoadedModel
from .readout import generate
from .stats import corpus_texts

FIXED_PROMPT = "The most important thing to know about the history of Europe is"


@dataclass
class Watch:
    """What every checkpoint of a run measures."""

    retention: list[tuple[int, EvalRecord]]  # (position in the run, record): a fixed sample
    heldout: list[EvalRecord]  # facts the run never edits
    documents: list[str]  # held-out text for perplexity
    prompt: str = FIXED_PROMPT
    ge_records: int = 20  # held-out records whose generation prompts are sampled for GE
    gen_tokens: int = 100
    seed: int = 0
    weight_norms: dict[int, float] = field(default_factory=dict)  # ‖W₀‖ per edited layer


def retention_sample(records: list[EvalRecord], size: int) -> list[tuple[int, EvalRecord]]:
    """At most ``size`` records spread evenly over the run (the same ones at every checkpoint)."""
    step = max(1, math.ceil(len(records) / max(size, 1)))
    return [(i, records[i]) for i in range(0, len(records), step)][:size]


def heldout_documents(corpus: str, count: int, skip_tokens: int, tokenizer, max_chars: int = 2000) -> list[str]:
    """``count`` documents from the end of ``corpus``, none of them among those the first
    ``skip_tokens`` tokens (what C0 read) came from."""
    texts = list(corpus_texts(corpus))
    used, read = 0, 0
    for text in texts:  # how many documents C0's token stream reaches into
        if read >= skip_tokens:
            break
        read += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        used += 1
    spare = texts[used:]
    if len(spare) < count:
        raise ValueError(f"the corpus has only {len(spare)} documents that C0 did not read; asked for {count}")
    return [t[:max_chars] for t in spare[-count:]]


@torch.no_grad()
def perplexity(loaded: LoadedModel, texts: list[str], seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean NLL per predicted token) over the first ``seq_len`` tokens of each text."""
    tok, adapter = loaded.tokenizer, loaded.adapter
    seq_len = min(seq_len, adapter.context_length() or seq_len)
    rows = [list(tok(t, add_special_tokens=True)["input_ids"])[:seq_len] for t in texts]
    rows = [r for r in rows if len(r) > 1]
    total, count = 0.0, 0
    for first in range(0, len(rows), batch_size):
        part = rows[first : first + batch_size]
        width = max(map(len, part))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in part], device=loaded.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in part], device=loaded.device)
        hidden, _ = adapter.run_body(ids, mask, (mask.cumsum(1) - 1).clamp_min(0))
        logp = adapter.logits(hidden[:, :-1]).log_softmax(-1)
        target = ids[:, 1:].to(logp.device)
        nll = -logp.gather(2, target[..., None])[..., 0]
        keep = mask[:, 1:].to(logp.device).bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return math.exp(total / max(count, 1))


def measure(editor: Editor, watch: Watch, edited: int, newest: list[dict] | None, kind: str,
            layers: list[int]) -> dict:
    """One checkpoint after the first ``edited`` records of the run were applied."""
    loaded = editor.loaded
    sample = [record for position, record in watch.retention if position < edited]
    retention = summarise(score_records(loaded, sample, kind, generation=False)) if sample else {}
    heldout_rows = score_records(loaded, watch.heldout, kind, generation=False) if watch.heldout else []
    texts = generation_texts(loaded, watch.heldout[: watch.ge_records], watch.gen_tokens, watch.seed)
    entropies = [metrics.generation_entropy(t) for record in texts for t in record]
    drift = {}
    for layer in layers:
        change = editor.ledger.drift(layer)
        drift[str(layer)] = float(change.norm()) if change is not None else 0.0
    return {
        "edits": edited,
        "retention": retention, "retention_n": len(sample),
        "newest": summarise(newest) if newest else {},
        "heldout_kept": 100 * fmean(1 - r["ES"] for r in heldout_rows) if heldout_rows else None,
        "heldout_NS": summarise(heldout_rows).get("NS") if heldout_rows else None,
        "GE": fmean(entropies) if entropies else None,
        "perplexity": perplexity(loaded, watch.documents) if watch.documents else None,
        "delta_norms": drift,
        "weight_norms": {str(k): v for k, v in watch.weight_norms.items()},
        "text": generate(loaded, [watch.prompt], max_new_tokens=40, top_k=None)[0],
    }
