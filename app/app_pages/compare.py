"""Compare page: the editors side by side on the same facts (the Edit page's or the
examples, a seeded CounterFact sample, or an upload), each from the original weights,
repeated with different seeds; per fact and mean, with CSV and JSON downloads. Nothing
here is kept in the session. The logic is in emmet_core.studio.comparison."""

import streamlit as st

from app_pages import classroom, common
from emmet_core.data import EvalRecord
from emmet_core.hparams import EDITOR_NAMES
from emmet_core.request import EditRequest
from emmet_core.studio import comparison, figures
from emmet_core.studio.comparison import CompareRun, Tracker
from emmet_core.studio.suggest import judgeable
from emmet_core.studio.workflows import check_lengths, parse_lines, parse_neighbours, record_for
from emmet_core.studio.workspace import Session

ALGORITHMS = EDITOR_NAMES
state = st.session_state
EDIT_PAGE = "The fact on the Edit page"
PICKED = "The Edit page's fact or the examples"


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


def picked_facts() -> list[EvalRecord]:
    """The facts picked by hand from :func:`options`."""
    choices = options()
    default = [label for label in choices if label.startswith(EDIT_PAGE)][:1] or list(choices)[:1]
    picked = st.multiselect("Facts", list(choices), default=default, key="compare_facts",
                            help="Several facts are edited together (ROME: one after the other).")
    return [record_for(*choices[label], case_id=i) for i, label in enumerate(picked)]


def run(session: Session, records: list[EvalRecord] | None, algorithms: list[str], gen_tokens: int,
        repeats: int, seed: int) -> None:
    with common.readable_errors("The comparison"):
        comparison.check(records, algorithms, repeats)
        for record in records or []:  # the shared model's time: the same caps as the Edit page
            check_lengths(record.request, record.paraphrase_prompts,
                          list(zip(record.neighborhood_prompts, record.neighborhood_targets)))
        tracker = Tracker(algorithms, repeats, len(records or []), seed)
        status_text = st.empty()
        progress = common.Progress()

        def step(name: str) -> None:
            tracker.on_step(name)
            progress.start, progress.end = tracker.span
            progress.reached = progress.start
            status_text.markdown(tracker.text())

        def phase(name: str) -> None:
            tracker.on_phase(name)
            status_text.markdown(tracker.text())
            progress(name)

        result = comparison.compare_repeats(session.shared, records or [], algorithms, repeats, seed, gen_tokens,
                                            source=common.source_note("compare"), on_step=step, on_phase=phase)
        progress.done("Done")
        status_text.empty()
        state.compare_run = result


def render(result: CompareRun) -> None:
    st.divider()
    for editor in result.algorithms:
        for error in result.errors(editor):
            st.warning(f"{ALGORITHMS.get(editor, editor)} did not run: {error}")
    repeats = len(result.seeds)
    st.markdown(f"**{result.facts} fact{'s' if result.facts != 1 else ''} × {len(result.algorithms)} "
                f"editor{'s' if len(result.algorithms) != 1 else ''} × {repeats} repeat{'s' if repeats != 1 else ''}"
                f"** (seed{'s' if repeats != 1 else ''} {', '.join(map(str, result.seeds))})")
    st.dataframe(comparison.summary_table(result), hide_index=True, key="compare_summary")
    st.caption("Means over the facts" + (", then mean ± standard deviation over the repeats" if repeats > 1 else "")
               + ". ES/PS/NS: share of rewrite / paraphrase / neighbour prompts where the right object is more "
               "likely (×100); S: their harmonic mean; EM/PM/NM: the same as probability differences; GE: "
               "entropy of sampled text (bits); margins: the right object's mean log-probability per token "
               "minus the other's (nats); P: mean probability on the prompts; – : does not apply.")
    st.plotly_chart(classroom.for_screen(figures.margin_chart(result.fact_rows(), threshold=common.clear_margin())),
                    key="compare_margins")
    common.good("each editor's rewrite and paraphrase points above the dashed clear-margin line, its neighbour "
                "points as high as the unedited model's.")
    means = result.mean_rows()
    st.plotly_chart(classroom.for_screen(figures.compare_scores_chart(means)), key="compare_scores")
    common.good("every editor's ES and PS near 100 and NS near the unedited model's; S sums them up.")
    st.plotly_chart(classroom.for_screen(figures.compare_details_chart(means)), key="compare_details")
    common.good("for each editor, GE within ~0.3 bits of the unedited model's, P(new) far above P(old), a small ‖Δ‖.")
    with st.expander(f"Per fact ({len(result.fact_rows())} rows: fact × editor × repeat)"):
        st.dataframe(comparison.fact_table(result, threshold=common.clear_margin()), hide_index=True,
                     key="compare_per_fact")
    left, right = st.columns(2)
    left.download_button("Download everything (JSON)", result.to_json(), file_name="emmet-compare.json",
                         mime="application/json", icon=":material/download:", on_click="ignore", key="compare_json")
    right.download_button("Download per-fact and mean rows (CSV)", result.to_csv(), file_name="emmet-compare.csv",
                          mime="text/csv", icon=":material/download:", on_click="ignore", key="compare_csv")


session = common.require_session()
st.title("Compare the editors")
st.caption("The same facts through each editor, every one starting from the original weights with the model's "
           "presets, scored per fact. Your own edits are not involved and nothing is kept.")
records = common.fact_source("compare", 10, others={PICKED: picked_facts})
algorithms = st.pills("Editors", list(ALGORITHMS), default=["rome", "memit", "emmet"], selection_mode="multi",
                      format_func=ALGORITHMS.get, key="compare_algorithms")
left, middle, right = st.columns(3)
gen_tokens = left.number_input("Generated tokens per text (GE)", 0, 200, 40, step=10, key="compare_gen_tokens",
                               help="0 skips generation (and GE).")
repeats = middle.number_input("Repeats", 1, comparison.MAX_REPEATS, 1, key="compare_repeats",
                              help="Each repeat runs every editor again with the next seed (the facts stay "
                                   "the same); the tables then show mean ± standard deviation over repeats.")
seed = right.number_input("First seed", 0, 2**31 - 1, 0, key="compare_run_seed",
                          help="Repeat r uses seed + r for everything random: the context templates the "
                               "editors average over and the sampled texts of GE.")
if st.button("Run the comparison", type="primary", icon=":material/play_arrow:", key="run_compare"):
    run(session, records, list(algorithms or []), int(gen_tokens), int(repeats), int(seed))
shown = state.get("compare_run")
if shown is not None and shown.model == session.loaded.name:
    render(shown)
