"""Edit page: one fact, one editor, and everything the edit did around it."""

import time

import streamlit as st

from app_pages import classroom, common
from emmet_core.errors import EditError
from emmet_core.hparams import EDITOR_NAMES, parse_layers
from emmet_core.request import EditRequest
from emmet_core.studio import figures
from emmet_core.studio.judge import tally
from emmet_core.studio.workflows import (
    EditReport,
    FactChecks,
    check_lengths,
    edit_fact,
    format_neighbours,
    generate_texts,
    parse_lines,
    parse_neighbours,
)
from emmet_core.studio.workspace import ModelBusyError, Session

ALGORITHMS = EDITOR_NAMES
state = st.session_state


def load_example() -> None:
    """Selectbox callback: put an example fact into the inputs."""
    label = state.get("example")
    for example in common.examples():
        if common.example_label(example) == label:
            state.subject, state.prompt, state.target_new = (example[k] for k in ("subject", "prompt", "target_new"))


def filled_box(widget, label: str, name: str, **kwargs) -> None:
    """Draw the box of ``name`` (see :func:`common.box_key`); ``state[name]`` is what it shows."""
    key = common.box_key(name)
    state.setdefault(key, state.get(name) or "")  # back from another page: Streamlit forgot the widget
    widget(label, key=key, **kwargs)
    state[name] = state[key]


def prefill(session: Session) -> dict[str, object]:
    """The old object is what the model says now; paraphrases and neighbours are
    suggested once per (subject, relation), then left to the user.

    Returns the keys to mark as done once the widgets are drawn: a run that is
    interrupted (the user typed on) before that must fill them in again, or the
    browser's stale values would win."""
    try:
        request = EditRequest(state.prompt, state.subject, "?")
        check_lengths(request)
    except EditError:
        return {}  # the Apply button says what is wrong
    done: dict[str, object] = {}
    answer_key = (session.id, session.version, request.text)
    if state.get("_answer_for") != answer_key:
        answers = state.setdefault("_answers", {})
        if answer_key not in answers:
            try:
                answers[answer_key] = session.answer([request.text], timeout=3)[0]
            except ModelBusyError:
                st.caption("Another session is editing: the model's answer is filled in when it is free.")
                state["_answer_pending"] = True  # the page asks again once it is drawn (bottom of this file)
            except EditError as exc:
                st.error(f"Reading the model's answer: {exc}")
        if answer_key in answers:
            common.fill("target_true", answers[answer_key])
            done["_answer_for"] = answer_key
    suggest_key = (request.subject, request.prompt)
    if state.get("_suggested_for") != suggest_key:
        paraphrases, neighbours = common.suggestions(request.subject, request.prompt, state.get("target_true"),
                                                     state.get("target_new"))
        common.fill("paraphrases", "\n".join(paraphrases))
        common.fill("neighbours", format_neighbours(neighbours))
        done["_suggested_for"] = suggest_key
    return done


def resuggest() -> None:
    state.pop("_suggested_for", None)


def fact_inputs(session: Session) -> None:
    labels = [common.example_label(e) for e in common.examples()]
    st.selectbox("Start from an example", labels, index=None, key="example", on_change=load_example,
                 placeholder="Pick a ready-made fact, or type your own below")
    left, middle, right = st.columns([2, 3, 2])
    left.text_input("Subject", key="subject", placeholder="Danielle Darrieux")
    middle.text_input("Relation prompt", key="prompt", placeholder="The mother tongue of {} is",
                      help="Put {} where the subject goes, or write a sentence that contains the subject.")
    right.text_input("New object", key="target_new", placeholder="English")
    done = prefill(session)
    left, middle, right = st.columns([2, 3, 2])
    filled_box(left.text_input, "Old object (the model's answer now)", "target_true",
               help="Filled in with what the model says; change it if you mean another old object.")
    with middle:
        st.segmented_control("Editor", list(ALGORITHMS), key="algorithm", default="rome",
                             format_func=ALGORITHMS.get, required=True,
                             help="\n\n".join(f"**{ALGORITHMS[a]}**: {classroom.EDITORS_HELP[a]}" for a in ALGORITHMS))
    right.number_input("Generated tokens per text", 0, 200, 40, step=10, key="gen_tokens",
                       help="Sampled continuations before and after (for the generation entropy); 0 skips them.")
    left, right = st.columns(2)
    filled_box(left.text_area, "Paraphrases (one per line)", "paraphrases", height=120,
               help="Other wordings of the same fact: the edit should carry over to them.")
    filled_box(right.text_area, "Neighbours: other subjects, same relation (prompt | their object)", "neighbours",
               height=120, help="These facts should stay as they are. Leave out '| object' to use the model's "
                                "own answer.")
    state.update(done)
    st.button("Suggest paraphrases and neighbours again", on_click=resuggest, type="tertiary",
              icon=":material/refresh:")


def advanced(session: Session, algorithm: str) -> dict:
    """The main hyper-parameters, initialised from the model's preset for ``algorithm``."""
    preset = session.hparams(algorithm)
    prefix = f"hp.{session.loaded.name}.{algorithm}."
    values: dict = {}
    with st.expander(f"Advanced: {ALGORITHMS[algorithm]} hyper-parameters (preset for {session.loaded.name})"):
        first, second, third, fourth = st.columns(4)
        layers = first.text_input("Layers", ",".join(map(str, preset.layers)), key=prefix + "layers",
                                  help=f"0 … {session.loaded.adapter.num_layers - 1}; e.g. 4, 2-6 or 2,4,6. "
                                       "ROME edits exactly one.")
        values["v_num_grad_steps"] = second.number_input("Optimisation steps", 1, 200, preset.v_num_grad_steps,
                                                         key=prefix + "steps")
        values["v_lr"] = third.number_input("Learning rate", 0.001, 10.0, preset.v_lr, format="%.3f",
                                            key=prefix + "lr")
        values["clamp_norm_factor"] = fourth.number_input("Norm clamp ‖δ‖/‖v‖", 0.01, 100.0,
                                                          preset.clamp_norm_factor, key=prefix + "clamp")
        values["kl_factor"] = first.number_input("KL factor", 0.0, 10.0, preset.kl_factor, format="%.4f",
                                                 key=prefix + "kl")
        values["v_weight_decay"] = second.number_input("Weight decay", 0.0, 10.0, preset.v_weight_decay,
                                                       format="%.4f", key=prefix + "decay")
        if algorithm != "rome":
            values["mom2_update_weight"] = third.number_input(
                "Covariance weight m", 0.0, 1e6, float(preset.mom2_update_weight), key=prefix + "mom2",
                help="How much the preserved keys weigh against the new facts (mom2_update_weight; the MEMIT "
                     "paper's λ). See the Learn page.")
        if algorithm == "emmet":
            values["emmet_lambda"] = fourth.number_input("EMMET λ (ridge ρ = m·λ)", 0.0, 100.0, preset.emmet_lambda,
                                                         format="%.3f", key=prefix + "lambda")
        if algorithm == "alphaedit":
            values["nullspace_threshold"] = fourth.number_input(
                "Null-space threshold", 1e-6, 100.0, preset.nullspace_threshold, format="%.4f", key=prefix + "null",
                help="Directions of C0 with eigenvalues below it form the null space the update is projected on.")
        if algorithm == "encore":
            values["encore_norm_weight"] = fourth.number_input(
                "Norm weight μ", 0.0, 1e6, preset.encore_norm_weight, format="%.3f", key=prefix + "mu",
                help="Pulls the matrix back towards its original: μ‖W − W₀‖² in the objective.")
        if algorithm == "rome":
            values["rome_variant"] = third.selectbox("ROME variant", ["rebuilt", "original"],
                                                     index=["rebuilt", "original"].index(preset.rome_variant),
                                                     key=prefix + "variant")
        values["stats_tokens"] = int(fourth.number_input("C0 corpus tokens", 1000, 10_000_000, preset.stats_tokens,
                                                         step=10_000, key=prefix + "stats"))
    values["layers"] = layers
    return values


def cancel() -> None:
    """The Cancel button: its click interrupts the running edit (Streamlit stops the
    script at its next call, between two steps); the session and the shared model stay
    as they were — unless the edit had already been applied (the page then says so) —
    and texts being written stop until asked for again."""
    state["_cancelled"] = True
    state["_texts_for"] = None


def cancelled_message(session: Session) -> None:
    """After a Cancel: did it stop the edit, or come after the edit was applied?"""
    if session.version == state.get("_version_before_apply", session.version):
        st.info("The edit was cancelled: nothing was changed.", icon=":material/cancel:")
    else:
        st.warning("Cancel came after the edit was applied: it is kept (undo it on the History page). The texts "
                   "were stopped.", icon=":material/cancel:")


def apply(session: Session, algorithm: str, settings: dict) -> bool:
    """Apply the page's fact; True when it was applied."""
    with common.readable_errors("The edit"):
        request = EditRequest(state.prompt, state.subject, state.target_new, (state.target_true or "").strip() or None)
        paraphrases, neighbours = parse_lines(state.paraphrases or ""), parse_neighbours(state.neighbours or "")
        check_lengths(request, paraphrases, neighbours)
        hp = session.hparams(algorithm, **{**settings, "layers": parse_layers(settings["layers"])})
        checks = FactChecks(paraphrases, neighbours, gen_tokens=int(state.gen_tokens))
        st.button("Cancel", key="cancel_edit", on_click=cancel, icon=":material/cancel:",
                  help="Stops the edit between two steps; nothing is changed.")
        with st.status(f"Applying {ALGORITHMS[algorithm]}…", expanded=True) as status:
            progress = common.Progress(timed=True)
            try:
                state["_version_before_apply"] = session.version
                report = edit_fact(session, request, checks, algorithm, hp, on_phase=progress,
                                   on_wait=progress.waiting, cache_values=classroom.lecture_mode())
                state.edit_report = (session.id, report)  # before any Streamlit call a Cancel could stop
            except BaseException:
                status.update(label="The edit was not applied", state="error")
                raise
            status.update(label=f"Applied: edit {report.seconds['edit']:.1f} s, reading the model "
                                f"{report.seconds['reading before'] + report.seconds['reading after']:.1f} s",
                          state="complete", expanded=False)
        state["_texts_for"] = id(report) if not classroom.lecture_mode() else None
        return True
    return False


def render(report: EditReport, session: Session) -> None:
    request, before, after = report.request, report.before, report.after
    margin = common.clear_margin()
    st.divider()
    if report.record not in session.records:
        st.info("This edit has been undone; the results below show what it did.")
    st.subheader(f"{request.text} … {request.target_true} → {request.target_new}")
    if report.already_new:
        st.warning(f"Before the edit the model already preferred “{request.target_new}” to "
                   f"“{request.target_true}” on this prompt: the edit proves little here.", icon=":material/info:")
    paraphrases = tally([p.as_new(margin) for p in after.paraphrases])
    neighbours = tally([p.as_kept(margin) for p in after.neighbours])
    # Six numbers in a row; on a projector's larger type two rows of three keep their labels whole.
    columns = [*st.columns(3), *st.columns(3)] if classroom.lecture_mode() else st.columns(6)
    columns[0].metric(f"P({request.target_new})", common.percent(after.rewrite.p_new),
                      f"{(after.rewrite.p_new - before.rewrite.p_new) * 100:+.1f} pts",
                      help=f"Rewrite prompt after the edit: {after.rewrite.as_new(margin).label()} (margin in nats)")
    columns[1].metric(f"P({request.target_true})", common.percent(after.rewrite.p_true),
                      f"{(after.rewrite.p_true - before.rewrite.p_true) * 100:+.1f} pts", delta_color="off")
    columns[2].metric("Paraphrases passed", f"{paraphrases['passed']} / {paraphrases['total']}",
                      f"{paraphrases['weak']} weak" if paraphrases["weak"] else None, delta_color="off",
                      help=f"✓: the new object more likely; ✓? by less than the clear margin ({margin:g} nats).")
    columns[3].metric("Neighbours kept", f"{neighbours['passed']} / {neighbours['total']}",
                      f"{neighbours['weak']} weak" if neighbours["weak"] else None, delta_color="off",
                      help="Kept: the neighbour's own object still more likely than the new object.")
    columns[4].metric("‖Δ‖", ", ".join(common.format_value(v, "norm") for v in report.record.norms.values()),
                      help="Frobenius norm of the update of each edited layer.")
    columns[5].metric("Time", f"{report.total_seconds:.1f} s",
                      help="What you waited: reading the model before, the edit, reading after, the texts.")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(classroom.for_screen(figures.prompt_chart(before.rewrite, after.rewrite)), key="chart_prompt")
        common.good("P(new) high after the edit, P(old) low.")
    if after.paraphrases:
        with right:
            st.plotly_chart(classroom.for_screen(figures.paraphrase_chart(before.paraphrases, after.paraphrases,
                                                                       margin)), key="chart_paraphrases")
            common.good(f"every paraphrase ✓: the new object more likely by ≥ {margin:g} nats per token "
                        "(✓? is a win by less).")
    else:
        right.info("No paraphrases given: add some above to check that the edit generalises.")
    left, right = st.columns(2)
    if after.neighbours:
        with left:
            st.plotly_chart(classroom.for_screen(figures.neighbour_chart(before.neighbours, after.neighbours, margin)),
                            key="chart_neighbours")
            common.good("bars unchanged: each neighbour keeps its own object (✓).")
    else:
        left.info("No neighbours given: add other subjects of the same relation to check that they stay.")
    entropy_slot = right.empty()
    tables(report, margin)
    texts(report, session, entropy_slot)
    numbers(report)


def tables(report: EditReport, threshold: float) -> None:
    before, after = report.before, report.after
    with st.expander("Probabilities per prompt"):
        rows = [{"kind": kind, "prompt": a.prompt, "object": a.new if kind == "paraphrase" else a.true,
                 "P before": common.format_value(b.p_new if kind == "paraphrase" else b.p_true),
                 "P after": common.format_value(a.p_new if kind == "paraphrase" else a.p_true),
                 "result": (a.as_new(threshold) if kind == "paraphrase" else a.as_kept(threshold)).label()}
                for kind, pairs in (("paraphrase", zip(before.paraphrases, after.paraphrases)),
                                    ("neighbour", zip(before.neighbours, after.neighbours)))
                for b, a in pairs]
        if rows:
            st.dataframe(rows, hide_index=True, column_config={
                "result": st.column_config.TextColumn(help="✓ clear win, ✓? win by less than the clear margin, "
                                                           "✗ failed, = the two objects are the same text; "
                                                           "the number is the margin in nats per token")})


def texts(report: EditReport, session: Session, entropy_slot) -> None:
    """The texts before and after, written as they are generated (after the charts)."""
    if not report.gen_tokens or not report.generation_prompts:
        return
    st.markdown("##### Generated text, before and after (same sampling seed)")
    if report.texts_pending and state.get("_texts_for") != id(report):
        if st.button(f"Write {len(report.generation_prompts)} texts before and after", key="write_texts",
                     icon=":material/edit_note:"):
            state["_texts_for"] = id(report)
        else:
            st.caption("Lecture mode: texts are written when you ask.")
            return
    slots = {}
    for index, prompt in enumerate(report.generation_prompts):
        left, right = st.columns(2)
        for side, column in (("before", left), ("after", right)):
            with column.container(border=True):
                caption, body = st.empty(), st.empty()
                slots[side, index] = (caption, body)
                done = getattr(report, side).texts
                if done:
                    caption.caption(f"{side.capitalize()} · entropy {getattr(report, side).entropy[index]:.2f} bits")
                    body.markdown(f"**{common.escape(prompt)}** {common.escape(done[index])}")
                else:
                    caption.caption(f"{side.capitalize()} · waiting")
                    body.markdown(f"**{common.escape(prompt)}** …")
    if report.texts_pending:
        def show(side: str, so_far: list[str]) -> None:
            for index, text in enumerate(so_far):
                caption, body = slots[side, index]
                caption.caption(f"{side.capitalize()} · writing…")
                body.markdown(f"**{common.escape(report.generation_prompts[index])}** {common.escape(text)} ▌")

        with common.readable_errors("Writing the texts"):
            generate_texts(session, report, on_text=show)
        for (side, index), (caption, body) in slots.items():
            reading = getattr(report, side)
            if reading.texts:
                caption.caption(f"{side.capitalize()} · entropy {reading.entropy[index]:.2f} bits")
                body.markdown(f"**{common.escape(report.generation_prompts[index])}** "
                              f"{common.escape(reading.texts[index])}")
    if report.after.texts:
        with entropy_slot.container():
            st.plotly_chart(classroom.for_screen(figures.entropy_chart(
                report.generation_prompts, report.before.entropy, report.after.entropy)), key="chart_entropy")
            common.good("after within about 0.3 bits of before; a clear drop means the text turned repetitive.")


def numbers(report: EditReport) -> None:
    record = report.record
    st.markdown("##### The edit's numbers")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(classroom.for_screen(figures.norm_chart(record.norms)), key="chart_norms")
        common.good("small: the smaller the update, the less the rest of the model moves.")
    with right:
        st.plotly_chart(classroom.for_screen(figures.phase_chart(
            {**{k: v for k, v in report.seconds.items() if k != "edit"}, **record.seconds,  # the edit by phase
             "total": report.total_seconds})), key="chart_phases")
        classroom.value_cache_caption(record)
    with st.expander("Hyper-parameters used"):
        st.json(record.results[0].hparams.to_dict(), expanded=False)


session = common.require_session()
st.title("Edit a fact")
st.caption("Rewrite one fact inside the model with ROME, MEMIT, EMMET, AlphaEdit or ENCORE, then see what changed: "
           "the prompt, its paraphrases, other subjects of the same relation, and the text the model writes.")
fact_inputs(session)
algorithm = state.get("algorithm") or "rome"
classroom.editor_help(algorithm)
settings = advanced(session, algorithm)
if state.pop("_cancelled", False):
    cancelled_message(session)
applied = False
clicked = st.button(f"Apply edit with {ALGORITHMS[algorithm]}", type="primary", icon=":material/bolt:", key="apply")
# The Cancel button and progress of an edit in flight, in one slot drawn on every run: the
# report below then keeps its place when the page reruns after the edit, instead of
# showing twice while the rerun replaces it.
in_flight = st.empty()
if clicked:
    with in_flight.container():
        applied = apply(session, algorithm, settings)
shown = state.get("edit_report")
if shown is not None and shown[0] == session.id:
    render(shown[1], session)
if applied:  # once the texts are written: the sidebar's edit count is drawn before the page
    st.rerun()
st.divider()
classroom.ask_box(session, key="edit_ask")
if state.pop("_answer_pending", False):  # the model was busy: try the old object again shortly
    time.sleep(1.0)
    st.rerun()
