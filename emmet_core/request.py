"""The edit request: one fact to rewrite, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequestError

SUBJECT_SLOT = "{}"


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

    def __post_init__(self) -> None:
        subject = (self.subject or "").strip()
        if not subject:
            raise InvalidRequestError("subject is empty")
        if not (self.target_new or "").strip():
            raise InvalidRequestError(f"target_new is empty for subject {subject!r}")
        prompt = (self.prompt or "").rstrip()
        if not prompt.strip():
            raise InvalidRequestError(f"prompt is empty for subject {subject!r}")
        slots = prompt.count(SUBJECT_SLOT)
        if slots > 1:
            raise InvalidRequestError(f"prompt {prompt!r} has {slots} '{{}}' slots; use exactly one")
        if slots == 0:
            index = prompt.find(subject)
            if index < 0:
                raise InvalidRequestError(
                    f"subject {subject!r} does not occur in prompt {prompt!r}; "
                    "put '{}' where the subject goes or include it verbatim"
                )
            prompt = prompt[:index] + SUBJECT_SLOT + prompt[index + len(subject) :]
        target_new = self.target_new.strip()
        target_true = self.target_true.strip() if self.target_true else None
        if target_true is not None and target_true == target_new:
            raise InvalidRequestError(
                f"target_new equals target_true ({target_new!r}) for subject {subject!r}"
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

    def with_target_true(self, target_true: str) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, target_true)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` into the single ``{}`` slot (no str.format: prompts may hold braces)."""
    return template.replace(SUBJECT_SLOT, subject, 1)


def check_conflicts(requests: list[EditRequest]) -> None:
    """Reject a batch that asks the same (subject, relation) for two different objects."""
    seen: dict[tuple[str, str], str] = {}
    for request in requests:
        key = (request.subject, request.prompt)
        previous = seen.setdefault(key, request.target_new)
        if previous != request.target_new:
            raise InvalidRequestError(
                f"conflicting edits in one batch: {request.text!r} -> {previous!r} and "
                f"-> {request.target_new!r}"
            )
