"""Context templates: short model-sampled prefixes placed before the edit prompt.

Keys and values are averaged over prompts with random prefixes so the edit does not
depend on the prompt starting the text. The reference code samples them unseeded; here
the sampling uses its own ``torch.Generator`` and the result is cached on disk per
(model, recipe, seed), so two runs of the same edit see the same templates.
"""

from __future__ import annotations

import torch

from .diskcache import digest, read_json, write_json
from .errors import require_finite
from .models import LoadedModel, cache_dir

STARTERS = ("The", "Therefore", "Because", "I", "You")


def context_templates(
    loaded: LoadedModel,
    recipe: list[tuple[int, int]],
    seed: int = 0,
    top_k: int = 5,
    use_cache: bool = True,
) -> list[str]:
    """Return ``["{}", "<prefix>. {}", ...]``: the plain prompt first, then prefixes.

    ``recipe`` is a list of (length in tokens, how many): ROME uses [(5, 10), (10, 10)],
    MEMIT/EMMET [(10, 5)]. Prefixes cycle through :data:`STARTERS`.
    """
    key = {"model": loaded.fingerprint, "recipe": [list(x) for x in recipe], "seed": seed, "top_k": top_k}
    path = cache_dir() / "templates" / f"{digest(key)}.json"
    cached = read_json(path) if use_cache else None
    if isinstance(cached, dict) and cached.get("key") == key and _valid(cached.get("templates")):
        return cached["templates"]
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length, count in recipe:
        starters = [STARTERS[i % len(STARTERS)] for i in range(count)]
        for starter in dict.fromkeys(starters):
            n = starters.count(starter)
            for text in _sample(loaded, starter, n, length, top_k, generator):
                templates.append(_clean(text) + ". {}")
    if use_cache:
        write_json(path, {"key": key, "templates": templates})
    return templates


def _valid(templates: object) -> bool:
    return (isinstance(templates, list) and bool(templates) and templates[0] == "{}"
            and all(isinstance(t, str) and t.count("{}") == 1 for t in templates))


@torch.no_grad()
def _sample(
    loaded: LoadedModel, starter: str, n: int, length: int, top_k: int, generator: torch.Generator
) -> list[str]:
    """Top-k sampling of ``length`` tokens after ``starter`` for ``n`` rows."""
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = torch.tensor([tokenizer(starter)["input_ids"]] * n, device=loaded.device)
    start = ids.shape[1]
    for _ in range(length):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]
        require_finite(logits, "the model's next-token logits")
        # The seeded generator lives on the CPU (the same templates on every device), so
        # each step reads back its k candidates, not the whole vocabulary.
        top_logits, top_ids = (t.cpu() for t in logits.float().topk(top_k, dim=-1))
        choice = torch.multinomial(top_logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, top_ids.gather(1, choice).to(ids.device)], dim=1)
    generated = tokenizer.batch_decode(ids[:, start:], skip_special_tokens=True)
    return [f"{starter}{text}" if text.startswith(" ") else f"{starter} {text}" for text in generated]


def _clean(text: str) -> str:
    """One line, no braces (templates are filled by replacing '{}')."""
    text = text.replace("{", " ").replace("}", " ")
    return " ".join(text.split())
