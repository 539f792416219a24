"""Tokenisation helpers: locate the subject by character offsets, tokenise targets,
and pad rows on the right into one batch.

Offsets come from the fast tokenizer, so the subject is found the same way for BPE
(GPT-2, SmolLM) and SentencePiece (Llama, Gemma) vocabularies, wherever it sits in the
prompt, with or without a BOS token.
"""

from __future__ import annotations

import torch

from .errors import InvalidRequestError


def encode_with_subject(tokenizer, text: str, span: tuple[int, int]) -> tuple[list[int], int]:
    """Token ids of ``text`` (special tokens included) and the index of the token that
    holds the subject's last character."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    end = span[1]
    last = None
    for index, (start, stop) in enumerate(enc["offset_mapping"]):
        if stop > start and start < end:
            last = index
    if last is None:
        raise InvalidRequestError(f"could not locate the subject in the tokens of {text!r}")
    return list(enc["input_ids"]), last


def target_ids(tokenizer, target: str) -> list[int]:
    """Tokens of ``" " + target`` without special tokens; a lone SentencePiece "▁"
    piece in front (left by the leading space) is dropped."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    if not ids:
        raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    return list(ids)


def prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def pad_rows(
    rows: list[list[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to one (B, T) tensor plus attention mask; on the right by default (real tokens
    keep columns 0..n), on the left for texts that a later pass continues from a cache."""
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for row in rows:
        pad = [pad_id] * (width - len(row))
        ids.append(pad + list(row) if left else list(row) + pad)
        ones, zeros = [1] * len(row), [0] * (width - len(row))
        mask.append(zeros + ones if left else ones + zeros)
    # Built in Python and copied once: no per-row writes into a device tensor.
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device)


def check_length(rows: list[list[int]], limit: int | None, what: str) -> None:
    """Refuse sequences longer than the model's context window."""
    if limit is None:
        return
    longest = max(len(r) for r in rows)
    if longest > limit:
        raise InvalidRequestError(
            f"{what} is {longest} tokens long, more than the model's context of {limit}"
        )
