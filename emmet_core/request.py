"""The edit request: one fact to rewrite, validated on construction."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import InvalidRequestError

SUBJECT_SLOT = "{}"


def quote(text: str, width: int = 60) -> str:
    """``text`` quoted for an error message, shortened in the middle when long."""
    if len(text) <= width:
        return repr(text)
    return f"{text[: width // 2]!r} … {text[-width // 3 :]!r} ({len(text):,} characters)"


@dataclass(frozen=True)
class EditRequest:
    """Rewrite "prompt(subject) -> target_true" into "prompt(subject) -> target_new".

    ``prompt`` is either a template with one ``{}`` for the subject
    ("The mother tongue of {} is") or a sentence containing the subject verbatim
    ("The mother tongue of Danielle Darrieux is"); it is normalised to a template.
    ``target_true`` is the old object; ``None`` means "whatever the model says now".
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:  # messages quote inputs through quote(): never a whole essay back
        subject = (self.subject or "").strip()
        if not subject:
            raise InvalidRequestError("subject is empty")
        if not (self.target_new or "").strip():
            raise InvalidRequestError(f"target_new is empty for subject {quote(subject)}")
        prompt = (self.prompt or "").rstrip()
        if not prompt.strip():
            raise InvalidRequestError(f"prompt is empty for subject {quote(subject)}")
        slots = prompt.count(SUBJECT_SLOT)
        if slots > 1:
            raise InvalidRequestError(f"prompt {quote(prompt)} has {slots} '{{}}' slots; use exactly one")
        if slots == 0:
            found = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt)  # whole words only
            if found is None:
                inside = " (it occurs only inside a longer word)" if subject in prompt else ""
                raise InvalidRequestError(
                    f"subject {quote(subject)} does not occur in prompt {quote(prompt)}{inside}; "
                    "put '{}' where the subject goes or include it verbatim"
                )
            prompt = prompt[: found.start()] + SUBJECT_SLOT + prompt[found.end() :]
        target_new = self.target_new.strip()
        target_true = self.target_true.strip() if self.target_true else None
        if target_true is not None and target_true == target_new:
            raise InvalidRequestError(
                f"target_new equals target_true ({quote(target_new)}) for subject {quote(subject)}"
            )
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "target_new", target_new)
        object.__setattr__(self, "target_true", target_true)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.prompt, self.subject)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject inside :attr:`text`."""
        start = self.prompt.index(SUBJECT_SLOT)
        return start, start + len(self.subject)

    @property
    def key_text(self) -> str:
        """The text the edited matrix's key is read from: the prompt up to the end of the
        subject (the subject's last token sees nothing after it)."""
        return self.text[: self.subject_span[1]]

    def with_target_true(self, target_true: str) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, target_true)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` into the single ``{}`` slot (no str.format: prompts may hold braces)."""
    return template.replace(SUBJECT_SLOT, subject, 1)


def request_from(item: object, where: str = "request") -> EditRequest:
    """An :class:`EditRequest` from a mapping as users write them (a JSON object, a CSV
    row), with one readable error for unknown keys or values that are not text."""
    if isinstance(item, EditRequest):
        return item
    if not isinstance(item, Mapping):
        raise InvalidRequestError(f"{where} must be an object with prompt, subject and target_new, not {item!r}")
    allowed = [f.name for f in fields(EditRequest)]
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise InvalidRequestError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                                  f"allowed: {', '.join(allowed)}")
    for name, value in item.items():
        if not isinstance(value, str) and not (name == "target_true" and value is None):
            raise InvalidRequestError(f"{where}: {name} must be text, not {value!r}")
    return EditRequest(**item)


def check_conflicts(requests: list[EditRequest]) -> None:
    """Reject a batch that asks one key for two different objects.

    The edited matrix reads the subject's last token, which sees only the text before
    it: two prompts that agree up to the end of the subject ("Berlin is the capital of",
    "Berlin is in") give the same key, and one matrix cannot map one key to two values
    (EMMET drops one silently or learns neither; MEMIT averages them)."""
    seen: dict[str, EditRequest] = {}
    for request in requests:
        before = request.key_text
        previous = seen.setdefault(before, request)
        if previous.target_new != request.target_new:
            same = "the same prompt" if previous.text == request.text else \
                f"prompts that agree up to the subject ({before!r}), hence the same key,"
            raise InvalidRequestError(
                f"conflicting edits in one batch: {previous.text!r} -> {previous.target_new!r} and "
                f"{request.text!r} -> {request.target_new!r} have {same} with different new objects; "
                "edit them in separate batches or move the subject later in one prompt"
            )
