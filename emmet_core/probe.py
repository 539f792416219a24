"""Reading the model: probabilities of target strings and greedy generations, batched.

These are what an edit is judged by (before and after), so they live apart from the
editing code and never touch weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .models import LoadedModel
from .tokens import pad_rows, prompt_ids, target_ids


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
        return float(torch.tensor(self.logprob).exp())

    @property
    def mean_nll(self) -> float:
        return -self.logprob / self.n_tokens


@torch.no_grad()
def score_targets(
    loaded: LoadedModel, prompts: list[str], targets: list[str], batch_size: int = 32
) -> list[TargetScore]:
    """Teacher-forced score of ``" " + target`` after each prompt."""
    tok, adapter = loaded.tokenizer, loaded.adapter
    encoded = []
    for prompt, target in zip(prompts, targets):
        p_ids, t_ids = prompt_ids(tok, prompt.rstrip()), target_ids(tok, target)
        encoded.append((p_ids + t_ids, len(p_ids), t_ids))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # batch similar lengths: less padding
    scores: list[TargetScore | None] = [None] * len(encoded)
    for first in range(0, len(order), batch_size):
        part = order[first : first + batch_size]
        ids, mask = pad_rows([encoded[i][0] for i in part], tok.pad_token_id, loaded.device)
        hidden = adapter.body(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        for row, i in enumerate(part):
            _, start, t_ids = encoded[i]
            logp = adapter.logits(hidden[row, start - 1 : start - 1 + len(t_ids)]).log_softmax(-1)
            wanted = torch.tensor(t_ids, device=logp.device)
            token_logp = logp.gather(1, wanted[:, None])[:, 0]
            hits = int((logp.argmax(-1) == wanted).sum())
            scores[i] = TargetScore(float(token_logp.sum()), len(t_ids), hits)
    return scores


class _RowSeededTopK(LogitsProcessor):
    """Top-k sampling written as greedy decoding of (top-k logits + Gumbel noise), each
    row's noise drawn from its own generator seeded by (seed, prompt). The Gumbel-max
    trick makes the argmax an exact sample of softmax over the top k; the own generator
    makes a prompt's continuation independent of the other prompts in its batch."""

    def __init__(self, prompts: list[str], top_k: int, seed: int) -> None:
        self.top_k = top_k
        self.generators = [torch.Generator().manual_seed(_row_seed(seed, p)) for p in prompts]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
        return scores.masked_fill(scores < kth, float("-inf")) + gumbel.to(scores.device)


def _row_seed(seed: int, prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 30,
    batch_size: int = 16,
    top_k: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Continuations: greedy by default (before/after texts are comparable), or top-k
    sampling with ``seed`` (for generation entropy). Sampling uses per-prompt generators,
    so a text depends on (seed, prompt, weights) only: not on the global RNG, nor on the
    batch the prompt happened to share."""
    tok = loaded.tokenizer
    texts: list[str] = []
    for first in range(0, len(prompts), batch_size):
        chunk = [p.rstrip() for p in prompts[first : first + batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
        sampler = LogitsProcessorList([_RowSeededTopK(chunk, top_k, seed)]) if top_k else None
        out = loaded.model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, logits_processor=sampler,
            do_sample=False, top_k=None, top_p=None, temperature=None,
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
