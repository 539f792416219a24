"""Ask the model: a free-form prompt read by the original model and by a session's
edited model, side by side, as their most probable next tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError
from ..readout import top_next_tokens
from .workspace import Session

MAX_PROMPT_CHARS = 300  # a sentence or two; longer text is not a question to the model


@dataclass(frozen=True)
class Answers:
    """The top next tokens after one prompt, on the original weights and on a session's."""

    prompt: str
    original: list[tuple[str, float]]
    edited: list[tuple[str, float]]
    edits: int  # how many edits the session's model held when asked


def check_prompt(text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    """The prompt, stripped, if it is one: not empty and at most ``limit`` characters.
    The error names the length only, never echoes the text back."""
    prompt = text.strip()
    if not prompt:
        raise InvalidRequestError("type a prompt first")
    if len(prompt) > limit:
        raise InvalidRequestError(f"the prompt is {len(prompt)} characters long; at most {limit} are read")
    return prompt


def ask(session: Session, text: str, k: int = 5, timeout: float | None = None) -> Answers:
    """The ``k`` most probable next tokens after ``text`` on the original model (a fresh
    session on the same shared model holds no edits) and on ``session``'s model. A session
    without edits is read once: its model is the original."""
    prompt = check_prompt(text)

    def read(loaded) -> list[tuple[str, float]]:
        return top_next_tokens(loaded, prompt, k)

    original = Session(session.shared).run(read, timeout=timeout)
    edited = session.run(read, timeout=timeout) if session.deltas else original
    return Answers(prompt, original, edited, len(session.records))
