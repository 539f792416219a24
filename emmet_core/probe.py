"""Reading the model: probabilities of target strings and greedy generations, batched.

These are what an edit is judged by (before and after), so they live apart from the
editing code and never touch weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    scores: list[TargetScore] = []
    for first in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, target in zip(prompts[first : first + batch_size], targets[first : first + batch_size]):
            p_ids, t_ids = prompt_ids(tok, prompt.rstrip()), target_ids(tok, target)
            rows.append(p_ids + t_ids)
            spans.append((len(p_ids), t_ids))
        ids, mask = pad_rows(rows, tok.pad_token_id, loaded.device)
        hidden = adapter.body(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        for i, (start, t_ids) in enumerate(spans):
            logp = adapter.logits(hidden[i, start - 1 : start - 1 + len(t_ids)]).log_softmax(-1)
            wanted = torch.tensor(t_ids, device=logp.device)
            token_logp = logp.gather(1, wanted[:, None])[:, 0]
            hits = int((logp.argmax(-1) == wanted).sum())
            scores.append(TargetScore(float(token_logp.sum()), len(t_ids), hits))
    return scores


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
    sampling with ``seed`` (for generation entropy). Sampling runs inside
    ``fork_rng`` so the seed neither depends on nor disturbs the global RNG."""
    with torch.random.fork_rng(devices=[loaded.device] if loaded.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _generate(loaded, prompts, max_new_tokens, batch_size, top_k)


def _generate(loaded: LoadedModel, prompts: list[str], max_new_tokens: int, batch_size: int,
              top_k: int | None) -> list[str]:
    tok = loaded.tokenizer
    texts: list[str] = []
    for first in range(0, len(prompts), batch_size):
        chunk = [p.rstrip() for p in prompts[first : first + batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
        out = loaded.model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
            **({"do_sample": True, "top_k": top_k, "top_p": 1.0, "temperature": 1.0} if top_k else
               {"do_sample": False, "top_k": None, "top_p": None, "temperature": None}),
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
