"""Compare page: the same fact(s) through ROME, MEMIT and EMMET, each from the original
weights, side by side. Nothing here is kept in the session."""

import streamlit as st

from app_pages import common
from emmet_core.data import EvalRecord
from emmet_core.errors import InvalidRequestError
from emmet_core.hparams import EDITOR_NAMES
from emmet_core.request import EditRequest
from emmet_core.studio import figures
from emmet_core.studio.suggest import judgeable
from emmet_core.studio.workflows import CompareRow, compare, parse_lines, parse_neighbours, record_for
from emmet_core.studio.workspace import Session

ALGORITHMS = EDITOR_NAMES
state = st.session_state
EDIT_PAGE = "The fact on the Edit page"


def options() -> dict[str, tuple[EditRequest, list[str], list[tuple[str, str | None]]]]:
    """Facts to choose from: the Edit page's (with its paraphrases and neighbours) and
    the examples (with theirs)."""
    out = {}
    fact = common.current_fact()
    if fact is not None:
        paraphrases, neighbours = parse_lines(state.get("paraphrases") or ""), parse_neighbours(
            state.get("neighbours") or "")
        if not paraphrases and not neighbours:  # the Edit page has not suggested any yet
            paraphrases, neighbours = common.suggestions(fact.subject, fact.prompt, None, fact.target_new)
        out[f"{EDIT_PAGE}: {fact.text} → {fact.target_new}"] = (fact, paraphrases, neighbours)
    for example in common.examples():
        request = EditRequest(example["prompt"], example["subject"], example["target_new"])
        out[common.example_label(example)] = (request, list(example["paraphrases"]),
                                               judgeable([tuple(n) for n in example["neighbours"]],
                                                         request.target_new))
    return out


def table(rows: list[CompareRow]) -> list[dict]:
    out = []
    for row in rows:
        name = ALGORITHMS.get(row.algorithm, row.algorithm)
        if row.error:
            out.append({"editor": name, "note": row.error})
            continue
        entry = {"editor": name, "layers": ", ".join(map(str, row.layers)) or common.format_value(None)}
        entry.update({m: row.metrics.get(m) for m in ("ES", "PS", "NS", "GE", "S")})
        entry["P(new)"] = common.format_value(sum(row.p_new) / len(row.p_new) if row.p_new else None)
        entry["P(old)"] = common.format_value(sum(row.p_true) / len(row.p_true) if row.p_true else None)
        entry["‖Δ‖"] = row.delta_norm if row.algorithm != "unedited" else None
        entry["seconds"] = row.seconds.get("total") if row.algorithm != "unedited" else None
        entry["note"] = ""
        out.append(entry)
    return out


def run(session: Session, records: list[EvalRecord], algorithms: list[str], gen_tokens: int) -> None:
    with common.readable_errors("The comparison"):
        if not records:
            raise InvalidRequestError("choose at least one fact")
        if not algorithms:
            raise InvalidRequestError("choose at least one editor")
        steps = ["unedited", *algorithms]
        status_text = st.empty()
        progress = common.Progress()

        def step(name: str) -> None:
            index = steps.index(name)
            progress.start, progress.end = index / len(steps), (index + 1) / len(steps)
            progress.reached = progress.start
            status_text.markdown(f"**{ALGORITHMS.get(name, 'Reading the unedited model')}** "
                                 f"({index + 1} of {len(steps)})")

        rows = compare(session.shared, records, algorithms, gen_tokens=gen_tokens, on_step=step, on_phase=progress)
        progress.done("Done")
        status_text.empty()
        state.compare_rows = (session.shared.loaded.name, rows)


def render(rows: list[CompareRow]) -> None:
    st.divider()
    for row in rows:
        if row.error:
            st.warning(f"{ALGORITHMS.get(row.algorithm, row.algorithm)} did not run: {row.error}")
    st.dataframe(table(rows), hide_index=True, column_config={
        **{m: st.column_config.NumberColumn(format="%.1f") for m in ("ES", "PS", "NS", "S")},
        "GE": st.column_config.NumberColumn(format="%.2f", help="generation entropy, bits"),
        "‖Δ‖": st.column_config.NumberColumn(format="%.3g"),
        "seconds": st.column_config.NumberColumn(format="%.1f")})
    st.caption("ES/PS/NS: share of rewrite / paraphrase / neighbour prompts where the right object is more likely "
               "(×100); S: their harmonic mean; GE: entropy of sampled text; P: mean probability on the prompts.")
    st.plotly_chart(common.for_screen(figures.compare_scores_chart(rows)), key="compare_scores")
    common.good("every editor's ES and PS near 100 and NS near the unedited model's; S sums them up.")
    st.plotly_chart(common.for_screen(figures.compare_details_chart(rows)), key="compare_details")
    common.good("for each editor, GE within ~0.3 bits of the unedited model's, P(new) far above P(old), a small ‖Δ‖.")


session = common.require_session()
st.title("Compare the editors")
st.caption("The same fact(s) through ROME, MEMIT and EMMET, each starting from the original weights, with the "
           "model's presets. Your own edits are not involved and nothing is kept.")
choices = options()
default = [label for label in choices if label.startswith(EDIT_PAGE)][:1] or list(choices)[:1]
picked = st.multiselect("Facts", list(choices), default=default, key="compare_facts",
                        help="Several facts are edited together (ROME: one after the other).")
left, right = st.columns([2, 1])
algorithms = left.pills("Editors", list(ALGORITHMS), default=["rome", "memit", "emmet"], selection_mode="multi",
                        format_func=ALGORITHMS.get, key="compare_algorithms")
gen_tokens = right.number_input("Generated tokens per text (GE)", 0, 200, 40, step=10, key="compare_gen_tokens",
                                help="0 skips generation (and GE).")
if st.button("Run the comparison", type="primary", icon=":material/play_arrow:", key="run_compare"):
    records = [record_for(*choices[label], case_id=i) for i, label in enumerate(picked)]
    run(session, records, list(algorithms or []), int(gen_tokens))
shown = state.get("compare_rows")
if shown is not None and shown[0] == session.loaded.name:
    render(shown[1])
