"""Reading the model: probabilities of target strings and greedy generations, batched.

These are what an edit is judged by (before and after), so they live apart from the
editing code and never touch weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .errors import InvalidRequestError
from .models import LoadedModel
from .tokens import check_length, pad_rows, prompt_ids, target_ids


@dataclass
class TargetScore:
    logprob: float  # log P(target | prompt): sum over the target's tokens
    n_tokens: int
    hits: int  # target tokens that are the argmax under teacher forcing (zsRE accuracy)

    @property
    def greedy(self) -> bool:
        """Every target token is the argmax: the model "says" the target now."""
        return self.hits == self.n_tokens

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    @property
    def mean_nll(self) -> float:
        return -self.logprob / self.n_tokens


@torch.no_grad()
def score_targets(
    loaded: LoadedModel, prompts: list[str], targets: list[str], batch_size: int = 32
) -> list[TargetScore]:
    """Teacher-forced score of ``" " + target`` after each prompt.

    Each distinct prompt runs once; its KV cache then serves every target asked after it
    (an evaluation scores the new and the true object after each prompt, so this halves
    the work). Only targets of two or more tokens need the second, short pass.
    """
    tok, adapter = loaded.tokenizer, loaded.adapter
    asked: dict[str, list[int]] = {}  # prompt -> indices of the (prompt, target) pairs
    for i, prompt in enumerate(prompts):
        asked.setdefault(prompt.rstrip(), []).append(i)
    p_ids = {p: prompt_ids(tok, p) for p in asked}
    t_ids = [target_ids(tok, t) for t in targets]
    order = sorted(asked, key=lambda p: len(p_ids[p]))  # batch similar lengths: less padding
    scores: list[TargetScore | None] = [None] * len(prompts)
    for first in range(0, len(order), batch_size):
        part = order[first : first + batch_size]
        # Left padding keeps each prompt and its continuation contiguous in the cache
        # (sliding-window layers count cache positions, pads included).
        ids, mask = pad_rows([p_ids[p] for p in part], tok.pad_token_id, loaded.device, left=True)
        hidden, cache = adapter.run_body(ids, mask, _positions(mask))
        first_logp = adapter.logits(hidden[:, -1]).log_softmax(-1)  # predicts target token 0
        pairs = [(row, i) for row, p in enumerate(part) for i in asked[p]]
        rest = _continue(adapter, tok.pad_token_id, cache, mask, [(row, t_ids[i]) for row, i in pairs])
        # Every pair's sums stay on the device; the batch reads them back in one copy.
        wanted = torch.tensor([t for _, i in pairs for t in t_ids[i]], device=first_logp.device)
        sums, hits, start = [], [], 0
        for (row, i), later in zip(pairs, rest):
            logp = first_logp[row : row + 1] if later is None else torch.cat([first_logp[row : row + 1], later])
            tokens = wanted[start : start + len(t_ids[i])]
            start += len(t_ids[i])
            sums.append(logp.gather(1, tokens[:, None]).sum())
            hits.append((logp.argmax(-1) == tokens).sum())
        for (_, i), logprob, hit in zip(pairs, torch.stack(sums).tolist(), torch.stack(hits).tolist()):
            scores[i] = TargetScore(logprob, len(t_ids[i]), int(hit))
    return scores


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp_min(0)


def _continue(adapter, pad_id: int, cache, mask: torch.Tensor,
              pairs: list[tuple[int, list[int]]]) -> list[torch.Tensor | None]:
    """Log-probs of target tokens 1.. for each (prompt row, target) pair: the target's
    tokens but its last run after the prompt's cache (None for one-token targets)."""
    longer = [k for k, (_, target) in enumerate(pairs) if len(target) > 1]
    out: list[torch.Tensor | None] = [None] * len(pairs)
    if not longer:
        return out
    rows = torch.tensor([pairs[k][0] for k in longer], device=mask.device)
    cache.reorder_cache(rows)  # one cache row per pair (a prompt's row repeated for each of its targets)
    ids, cont_mask = pad_rows([pairs[k][1][:-1] for k in longer], pad_id, mask.device)
    positions = mask[rows].sum(1, keepdim=True) + _positions(cont_mask)
    hidden, _ = adapter.run_body(ids, torch.cat([mask[rows], cont_mask], 1), positions, cache)
    for j, k in enumerate(longer):
        out[k] = adapter.logits(hidden[j, : len(pairs[k][1]) - 1]).log_softmax(-1)
    return out


@torch.no_grad()
def top_next_tokens_batch(
    loaded: LoadedModel, prompts: list[str], k: int = 5, batch_size: int = 16
) -> list[list[tuple[str, float]]]:
    """For each prompt, the ``k`` most probable next tokens and their probabilities, most
    probable first: the model's whole answer to "what comes next", not just its greedy
    pick, so a reader sees how far an edit moved the distribution. Deterministic (no
    sampling); prompts are right-stripped like every other prompt the app reads."""
    if k < 1:
        raise InvalidRequestError(f"k must be at least 1, not {k}")
    tok, adapter = loaded.tokenizer, loaded.adapter
    rows = [prompt_ids(tok, p.rstrip()) for p in prompts]
    if not rows:
        return []
    if not all(rows):
        raise InvalidRequestError("an empty prompt has no next token to read")
    check_length(rows, adapter.context_length(), "the prompt")
    out: list[list[tuple[str, float]]] = []
    for first in range(0, len(rows), batch_size):
        # Left padding: every row's last column is its last real token.
        ids, mask = pad_rows(rows[first : first + batch_size], tok.pad_token_id, loaded.device, left=True)
        hidden, _ = adapter.run_body(ids, mask, _positions(mask))
        probs = adapter.logits(hidden[:, -1]).softmax(-1)  # float32 (logits() upcasts)
        top = probs.topk(min(k, probs.shape[-1]), dim=-1)
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):  # one copy to the host
            out.append([(tok.decode([i]), p) for i, p in zip(indices, values)])
    return out


def top_next_tokens(loaded: LoadedModel, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most probable next tokens after one prompt (:func:`top_next_tokens_batch`)."""
    return top_next_tokens_batch(loaded, [prompt], k)[0]


class _RowSeededTopK(LogitsProcessor):
    """Top-k sampling written as greedy decoding: at each step the token kept is the
    argmax of (top-k logits + Gumbel noise), an exact sample of softmax over the top k
    (the Gumbel-max trick). Each row's noise comes from its own generator seeded by
    (seed, prompt), so a prompt's continuation does not depend on the other prompts in
    its batch nor on the device. The noise of every step is drawn up front on the CPU and
    copied to the device once."""

    def __init__(self, prompts: list[str], top_k: int, seed: int, steps: int) -> None:
        uniform = torch.stack([
            torch.rand(steps, top_k, generator=torch.Generator().manual_seed(_row_seed(seed, p)), device="cpu")
            for p in prompts])
        self.gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))  # (rows, steps, k)
        self.top_k = top_k
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
            self.gumbel = self.gumbel.to(scores.device)
        noise = self.gumbel[:, input_ids.shape[1] - self.start]
        top, where = scores.float().topk(min(self.top_k, scores.shape[-1]), dim=-1)
        chosen = where.gather(1, (top + noise[:, : top.shape[1]]).argmax(-1, keepdim=True))
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def _row_seed(seed: int, prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "little") >> 1


SMALL_DECODE = 8  # rows: up to here a decoding step is too small to share between threads


@contextmanager
def decoding_threads(device: torch.device, rows: int) -> Iterator[None]:
    """One CPU thread while decoding a handful of rows (the app's texts). Such a step
    saves nothing with a second thread (2.52 vs 2.54 s for the Edit page's texts, idle)
    and, on a busy 2-core machine, the spinning thread made them 7× slower (3.6 s with
    one thread, 25.9 s with two; bench/edit_page.py). Larger batches (an evaluation's GE)
    keep every thread. Callers hold the model, so no other decoding runs meanwhile."""
    if device.type != "cpu" or rows > SMALL_DECODE or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Watch(LogitsProcessor):
    """Hands the texts generated so far (one per row) to ``on_texts`` before every new
    token is chosen; changes no score. Works for a whole batch, unlike transformers'
    streamers."""

    def __init__(self, tokenizer, on_texts: Callable[[list[str]], None]) -> None:
        self.tokenizer, self.on_texts = tokenizer, on_texts
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[1] > self.start:
            self.on_texts(self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True))
        return scores


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 30,
    batch_size: int = 16,
    top_k: int | None = None,
    seed: int = 0,
    on_texts: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """Continuations: greedy by default (before/after texts are comparable), or top-k
    sampling with ``seed`` (for generation entropy). Sampling uses per-prompt generators,
    so a text depends on (seed, prompt, weights) only: not on the global RNG, nor on the
    batch the prompt happened to share. ``on_texts`` hears the texts so far (one per
    prompt) as they grow, for a page that shows them as they are written."""
    if on_texts is not None and len(prompts) > batch_size:
        raise ValueError(f"on_texts follows one batch: at most {batch_size} prompts")
    tok = loaded.tokenizer
    texts: list[str] = []
    for first in range(0, len(prompts), batch_size):
        chunk = [p.rstrip() for p in prompts[first : first + batch_size]]
        enc = tok(chunk, padding=True, padding_side="left")
        enc = {name: torch.tensor(enc[name], device=loaded.device) for name in ("input_ids", "attention_mask")}
        processors = LogitsProcessorList([_RowSeededTopK(chunk, top_k, seed, max_new_tokens)] if top_k else [])
        if on_texts is not None:
            processors.insert(0, _Watch(tok, on_texts))
        with decoding_threads(loaded.device, len(chunk)):
            out = loaded.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                logits_processor=processors or None, do_sample=False, top_k=None, top_p=None, temperature=None,
            )
        texts.extend(tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


def greedy_answer(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """The object the model names now: its greedy continuation up to the first
    sentence or clause break."""
    answers = []
    for text in generate(loaded, prompts, max_new_tokens):
        cut = text.strip()
        for stop in ("\n", ".", ",", ";", "!", "?", " and ", " in ", " who "):
            cut = cut.split(stop)[0]
        answers.append(cut.strip() or text.strip().split(" ")[0])
    return answers
