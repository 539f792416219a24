"""The app in a lecture hall: lecture mode (large type and charts for a projector, texts
only when asked, the examples' v* prepared ahead), the "ask the model" box, and the short
explanations of each editor that link to the Learn page.

Pages call these beside :mod:`common`; the logic lives in ``emmet_core.studio``
(lecture, ask, display, figures).
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import common
from emmet_core.hparams import EDITOR_NAMES
from emmet_core.studio import figures
from emmet_core.studio.ask import MAX_PROMPT_CHARS, Answers, ask
from emmet_core.studio.lecture import example_requests, prepare_examples, value_cache_note
from emmet_core.studio.workspace import EditRecord, Session


def lecture_mode() -> bool:
    """The sidebar's lecture switch: texts written only when asked, large text and charts,
    v* of the prepared examples from the cache."""
    return bool(st.session_state.get("lecture_mode", False))


# -- lecture mode (issue 13): a projector, and examples whose v* is prepared ----------------
PROJECTOR_CSS = """
html { font-size: 20px; }  /* Streamlit sizes text and widgets in rem: all of it grows */
[data-testid="stMetricValue"] { font-size: 3rem; }
[data-testid="stMetricLabel"] p, [data-testid="stMetricDelta"] { font-size: 1.25rem; }
[data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li { font-size: 1.2rem; }
[data-testid="stCaptionContainer"] { font-size: 1.05rem; }
.katex { font-size: 1.35em; }
"""
PROJECTOR_SCALE = 1.5  # charts: fonts, heights and margins


def lecture_toggle() -> None:
    """Sidebar switch, drawn on every page by the entry point."""
    st.sidebar.toggle("Lecture mode", key="lecture_mode",
                      help="Large text and charts for a projector. The ready-made examples can be prepared "
                           "ahead, so that their edits take seconds in front of the audience.")


def projector_css() -> None:
    """Larger text and metrics in lecture mode (charts: :func:`for_screen`)."""
    if lecture_mode():
        st.html(f"<style>{PROJECTOR_CSS}</style>")


def for_screen(fig: go.Figure) -> go.Figure:
    """The figure as this session shows it: fonts enlarged in lecture mode."""
    return figures.scale_for_projector(fig, PROJECTOR_SCALE) if lecture_mode() else fig


def chart_height(base: int) -> int:
    """A height in pixels for what is drawn without plotly (taller in lecture mode)."""
    return round(base * PROJECTOR_SCALE) if lecture_mode() else base


def prepare_panel(current: Session | None) -> None:
    """Sidebar, lecture mode only: cache v* of the ready-made examples for the chosen
    editors, so that editing them on the Edit page takes seconds."""
    if current is None or not lecture_mode():
        return
    with st.sidebar:
        chosen = st.pills("Prepare for", list(EDITOR_NAMES), selection_mode="multi", format_func=EDITOR_NAMES.get,
                          default=[st.session_state.get("algorithm") or "rome"], key="prepare_editors")
        if st.button("Prepare the examples", icon=":material/bolt:", key="prepare_examples", disabled=not chosen,
                     help="Optimises the target values v* of the examples on the original model with each "
                          "editor's preset and caches them on the server. An edit of an example then reads v* "
                          "from the cache, as long as the session holds no earlier edit."):
            prepare(current, list(chosen))
        done = st.session_state.get("prepared", {}).get(current.loaded.name, {})
        if done:
            st.caption("Prepared: " + ", ".join(f"{EDITOR_NAMES[a]} ({p.facts} facts, {p.seconds:.0f} s)"
                                                 for a, p in done.items()))


def prepare(current: Session, algorithms: list[str]) -> None:
    requests = example_requests(common.examples())
    if not requests:
        st.info("There are no ready-made examples to prepare.")
        return
    bar = st.progress(0.0, text="Preparing the examples…")
    total, heard = len(requests) * len(algorithms), [0]

    def progress(k: int) -> None:
        heard[0] += k
        bar.progress(min(heard[0] / total, 1.0), text=f"v* of {heard[0]} of {total} (fact, editor) pairs")

    with common.readable_errors("Preparing the examples"):
        done = st.session_state.setdefault("prepared", {}).setdefault(current.loaded.name, {})
        for algorithm in algorithms:
            done[algorithm] = prepare_examples(
                current.shared, requests, algorithm, progress=progress,
                on_wait=lambda: bar.progress(heard[0] / total, text=common.PHASES["wait"]))
        bar.progress(1.0, text="The examples are ready")


def value_cache_caption(record: EditRecord) -> None:
    """Under an edit's numbers: whether its v* came from the prepared cache."""
    note = value_cache_note(record)
    if note:
        st.caption(note)


# -- ask the model ---------------------------------------------------------------------------
def ask_box(current: Session, key: str = "ask", k: int = 5) -> None:
    """A free prompt, and the top ``k`` next tokens of the original model and of this
    session's model side by side. ``key`` keeps the boxes of different pages apart."""
    st.markdown("##### Ask the model")
    text = st.text_input("Prompt", key=key, max_chars=MAX_PROMPT_CHARS,
                         placeholder="The Eiffel Tower is located in the city of",
                         help="The model's most probable next tokens, before any edit and with this session's edits.")
    if not text.strip():
        return
    with common.readable_errors("Asking the model"):
        answers = cached_answers(current, text, k)
        left, right = st.columns(2)
        edits = f"{answers.edits} edit{'s' if answers.edits != 1 else ''}"
        for column, title, tokens, name in ((left, "Original model", answers.original, "original"),
                                            (right, f"This session's model ({edits})", answers.edited, "session")):
            column.markdown(f"**{title}**")
            column.dataframe(token_rows(tokens), hide_index=True, key=f"{key}_{name}")
        common.good("after an edit, its prompt puts the new object on top on the right while the left stays as it was; "
             "an unrelated prompt reads the same in both columns.")


def cached_answers(current: Session, text: str, k: int) -> Answers:
    """One reading per (session state, prompt): reruns of the page do not run the model."""
    memo = st.session_state.setdefault("_asked", {})
    memo_key = (current.id, current.version, current.loaded.fingerprint, text.strip(), k)
    if memo_key not in memo:
        if len(memo) > 32:
            memo.clear()
        memo[memo_key] = ask(current, text, k, timeout=10)
    return memo[memo_key]


def token_rows(tokens: list[tuple[str, float]]) -> list[dict[str, str]]:
    """Tokens as words; blanks and control characters quoted so that they show."""
    def shown(token: str) -> str:
        text = token.strip()
        return text if text and text.isprintable() else repr(token)

    return [{"next token": shown(token), "P": common.format_value(p, "prob")} for token, p in tokens]


# -- explanations ----------------------------------------------------------------------------
LEARN_PAGE = "app_pages/learn.py"
EDITORS_HELP: dict[str, str] = {
    "rome": "ROME writes one fact at a time as a rank-one change of a single layer's MLP matrix W, so that the "
            "subject's key k* maps exactly to the new value v* (an equality constraint): see the Learn page.",
    "memit": "MEMIT writes a batch of facts over several layers by least squares, fitting each new key to its "
             "value while keeping the outputs of the keys summarised by C0 (weight m): see the Learn page.",
    "emmet": "EMMET writes a batch of facts with equality constraints, every new key mapped exactly to its "
             "value, up to a small ridge ρ = m·λ that keeps large batches stable: see the Learn page.",
    "alphaedit": "AlphaEdit solves MEMIT's least squares with the update projected onto the null space of the "
                 "preserved keys (C0's directions with near-zero eigenvalues), so their outputs do not move, and "
                 "keeps the keys of earlier edits in its objective: see the Learn page.",
    "encore": "ENCORE is MEMIT with a norm penalty μ‖W − W₀‖² that pulls the matrix back towards its original "
              "and with most-probable early stopping of v*, so that long runs of edits stay stable: see the "
              "Learn page.",
}


def editor_help(*algorithms: str) -> None:
    """One sentence on each of ``algorithms``, then a link to the Learn page."""
    if not algorithms:
        return
    for algorithm in algorithms:
        st.caption(EDITORS_HELP[algorithm])
    st.page_link(LEARN_PAGE, label="How the editors work", icon=":material/school:")
