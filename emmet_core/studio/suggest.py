"""Suggested paraphrases and neighbours for a fact, from CounterFact records when present.

An edit should carry over to other wordings of the same relation (paraphrases) and leave
other subjects of that relation alone (neighbours). CounterFact's MEND layout has no
relation ids, so relations are recovered from the data: each record's neighbourhood
prompt is an other subject in the same relation, and the record template that matches it
links the two wordings. Linked templates form a relation (e.g. "The mother tongue of {}
is", "{} is a native speaker of", "The native language of {} is"). Without data, generic
rewordings still give paraphrases; neighbours then come from the caller (examples, user).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..request import SUBJECT_SLOT, fill
from .judge import same_object

log = logging.getLogger(__name__)

# Wordings that keep the relation but change how the prompt starts (CounterFact's own
# paraphrases put unrelated text in front for the same reason).
GENERIC_PREFIXES = ("Here is a fact: ", "Quick question. ", "According to the encyclopedia, ")


@dataclass(frozen=True)
class Fact:
    """One CounterFact fact: a template, its subject and the true object."""

    template: str
    subject: str
    target: str


@dataclass
class RelationIndex:
    """Templates grouped into relations, with the facts known for each template."""

    facts: dict[str, list[Fact]] = field(default_factory=dict)  # template -> facts
    relation: dict[str, int] = field(default_factory=dict)  # template -> relation id
    paraphrases: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (subject, template) ->

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> RelationIndex:
        """Build from raw CounterFact records (MEND layout or ROME layout)."""
        index = cls()
        neighbours: list[tuple[str, str]] = []  # (record template, neighbourhood prompt)
        for record in records:
            parsed = _parse(record)
            if parsed is None:
                continue
            fact, paraphrases, hoods = parsed
            index.facts.setdefault(fact.template, []).append(fact)
            index.paraphrases.setdefault((fact.subject, fact.template), []).extend(paraphrases)
            neighbours.extend((fact.template, prompt) for prompt in hoods)
        index._link(neighbours)
        return index

    @classmethod
    def load(cls, data_dir: str | Path | None) -> RelationIndex | None:
        """Every ``counterfact*.json`` under ``data_dir/counterfact``; None when absent."""
        if data_dir is None:
            return None
        files = sorted((Path(data_dir) / "counterfact").glob("counterfact*.json"))
        records: list[dict] = []
        for file in files:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s for suggestions: %s", file, exc)
                continue
            records.extend(r for r in data if isinstance(r, dict))
        return cls.from_records(records) if records else None

    def _link(self, neighbours: list[tuple[str, str]]) -> None:
        """Union the templates that a neighbourhood prompt ties together."""
        parent = {template: template for template in self.facts}

        def root(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        parts = {t: t.split(SUBJECT_SLOT, 1) for t in self.facts}
        for template, prompt in neighbours:
            match = _best_match(prompt, parts)
            if match is not None:
                parent[root(match)] = root(template)
        roots = {t: root(t) for t in self.facts}
        ids = {r: i for i, r in enumerate(sorted(set(roots.values())))}
        self.relation = {t: ids[r] for t, r in roots.items()}

    def templates_of(self, template: str) -> list[str]:
        """Other wordings of ``template``'s relation, the most common first."""
        if template not in self.relation:
            return []
        rid = self.relation[template]
        same = [t for t, r in self.relation.items() if r == rid and t != template]
        return sorted(same, key=lambda t: (-len(self.facts[t]), t))

    def suggest_paraphrases(self, subject: str, template: str, k: int = 4) -> list[str]:
        """Known paraphrases of this subject's facts, then the relation's other wordings,
        then generic rewordings; ``k`` at most, without the prompt itself."""
        text = fill(template, subject)
        known = [p for t in [template, *self.templates_of(template)] for p in self.paraphrases.get((subject, t), [])]
        wordings = [fill(t, subject) for t in self.templates_of(template) if _specific(t)]
        return _first_unique([*known, *wordings[:2], *generic_paraphrases(text)], k, exclude={text})

    def suggest_neighbours(self, subject: str, template: str, true_object: str | None = None,
                           k: int = 5, new_object: str | None = None) -> list[tuple[str, str]]:
        """Other subjects with the same relation, as (prompt in the user's wording, their
        true object): first those whose object is the edited fact's old object (the ones
        an edit is most likely to drag along), then the rest; the same template first.
        Never one whose object is ``new_object``: it would prefer the new object whatever
        the edit did, a tie no check can judge."""
        candidates = list(self.facts.get(template, []))
        for other in self.templates_of(template):
            candidates.extend(self.facts[other])
        wanted = (true_object or "").strip().lower()
        ranked = sorted(candidates, key=lambda f: (f.target.strip().lower() != wanted, f.template != template))
        out: list[tuple[str, str]] = []
        seen = {subject}
        for fact in ranked:
            if fact.subject in seen or same_object(fact.target, new_object):
                continue
            seen.add(fact.subject)
            out.append((fill(template, fact.subject), fact.target))
            if len(out) == k:
                break
        return out


def generic_paraphrases(text: str) -> list[str]:
    """Rewordings that need no data: the prompt after a neutral lead-in."""
    return [prefix + text for prefix in GENERIC_PREFIXES]


def suggest(index: RelationIndex | None, subject: str, template: str, true_object: str | None = None,
            paraphrases: int = 4, neighbours: int = 5,
            new_object: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Paraphrases and neighbours for a fact, with or without an index."""
    if index is None:
        return generic_paraphrases(fill(template, subject))[:paraphrases], []
    return (index.suggest_paraphrases(subject, template, paraphrases),
            index.suggest_neighbours(subject, template, true_object, neighbours, new_object))


def judgeable(neighbours: Iterable[tuple[str, str | None]], new_object: str | None) -> list[tuple[str, str | None]]:
    """The neighbours whose own object is not the new object (see :mod:`judge`)."""
    return [(p, t) for p, t in neighbours if t is None or not same_object(t, new_object)]


# -- helpers -------------------------------------------------------------------------------
def _parse(record: dict) -> tuple[Fact, list[str], list[str]] | None:
    """(fact, paraphrase prompts, neighbourhood prompts) of a MEND or ROME record."""
    if "requested_rewrite" in record:
        rewrite = record.get("requested_rewrite") or {}
        prompt, subject = rewrite.get("prompt"), rewrite.get("subject")
        target = (rewrite.get("target_true") or {}).get("str")
        paraphrases = record.get("paraphrase_prompts") or []
        hoods = record.get("neighborhood_prompts") or []
    else:
        prompt, subject, target = record.get("prompt"), record.get("subject"), record.get("ground_truth")
        paraphrases = [record.get("rephrase_prompt")]
        hoods = [record.get("locality_prompt")]
    if not all(isinstance(x, str) and x.strip() for x in (prompt, subject, target)):
        return None
    if SUBJECT_SLOT not in prompt:
        if subject not in prompt:
            return None
        prompt = prompt.replace(subject, SUBJECT_SLOT, 1)
    fact = Fact(prompt.strip(), subject.strip(), target.strip())
    keep = [p.strip() for p in paraphrases if isinstance(p, str) and subject in p]
    return fact, keep, [h.strip() for h in hoods if isinstance(h, str) and h.strip()]


def _best_match(prompt: str, parts: dict[str, list[str]]) -> str | None:
    """The most specific template that ``prompt`` fills (longest fixed text)."""
    best, size = None, -1
    for template, (head, tail) in parts.items():
        fixed = len(head) + len(tail)
        if fixed > size and len(prompt) > fixed and prompt.startswith(head) and prompt.endswith(tail):
            best, size = template, fixed
    return best


def _specific(template: str) -> bool:
    """Enough fixed words to carry the relation ("{}, by" and "{}, a native" do not)."""
    words = [w for w in template.replace(SUBJECT_SLOT, " ").split() if sum(c.isalpha() for c in w) >= 3]
    return len(words) >= 2


def _first_unique(items: Iterable[str], k: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in exclude and item not in out:
            out.append(item)
        if len(out) == k:
            break
    return out

