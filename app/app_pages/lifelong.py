"""Lifelong page: stream facts into the model batch after batch, one or two editors side
by side, and watch what thousands of edits do to it. The work is in
``emmet_core.studio.lifelong_run``; this page starts, steps, pauses and draws it."""

import json
import random

import streamlit as st

from app_pages import classroom, common
from emmet_core.errors import EditError
from emmet_core.hparams import EDITOR_NAMES
from emmet_core.lifelong import FIXED_PROMPT, heldout_documents
from emmet_core.studio import figures
from emmet_core.studio.lifelong_run import LifelongRun
from emmet_core.studio.workspace import Session

state = st.session_state
HELDOUT = 10  # untouched CounterFact facts watched at each checkpoint
DOCUMENTS = 10  # held-out corpus documents for perplexity


def heldout_facts(records: list) -> list:
    """Facts of the CounterFact edit split that the run does not edit (seeded)."""
    files = [f for f in common.counterfact_files() if f.name == "counterfact-edit.json"]
    if not files:
        return []
    taken = {r.request.text for r in records}
    pool = [r for r in common.counterfact(str(files[0])) if r.request.text not in taken]
    return random.Random(1).sample(pool, min(HELDOUT, len(pool)))


def start(session: Session, records: list, algorithms: list[str], batch: int, every: int, prompt: str) -> None:
    with common.readable_errors("Starting the run"):
        if not records:
            raise EditError("no facts to stream: sample some or upload a file")
        if not algorithms:
            raise EditError("choose one or two editors")
        hp = session.hparams(algorithms[0])
        try:
            documents = heldout_documents(hp.stats_corpus, DOCUMENTS, hp.stats_tokens, session.loaded.tokenizer)
        except (EditError, ValueError):
            documents = []  # no corpus text to spare: the perplexity panel stays empty
        run = LifelongRun(session.shared, records, algorithms, batch, every, heldout_facts(records), documents,
                          prompt.strip() or FIXED_PROMPT)
        run.status = "ready"
        state.lifelong = (session.loaded.name, run)


def set_status(status: str) -> None:
    if state.get("lifelong"):
        state.lifelong[1].status = status


def step(run: LifelongRun) -> None:
    """One unit of work (a batch of one editor, or one checkpoint), the lock held only for it."""
    note = st.empty()
    failed = True
    with common.readable_errors("The run"):
        note.caption("Working…")
        note.caption(run.step(on_wait=lambda: note.caption("Another session is using the model: waiting for it…")))
        failed = False
    if failed:  # an error stops the run; what it measured stays
        run.status = "stopped"


def render(run: LifelongRun) -> None:
    labels = {"ready": "Ready", "running": "Running", "paused": "Paused", "stopped": "Stopped", "done": "Done"}
    st.progress(run.progress(), text=f"{labels[run.status]} · " + " · ".join(
        f"{EDITOR_NAMES[lane.algorithm]}: {lane.edited} of {run.total} facts, {len(lane.curves)} checkpoints"
        for lane in run.lanes))
    if not any(lane.curves for lane in run.lanes):
        return
    chart = figures.lifelong_chart([(lane.algorithm, lane.curves) for lane in run.lanes])
    st.plotly_chart(classroom.for_screen(chart), key="lifelong_chart")
    common.good("S of the edited facts stays high as facts pile up, untouched facts stay kept, GE and perplexity "
                "stay near their values at 0 edits, and ‖W − W₀‖ grows slowly.")
    columns = st.columns(len(run.lanes))
    for column, lane in zip(columns, run.lanes):
        if lane.curves:
            last = lane.curves[-1]
            first = lane.curves[0]
            column.markdown(f"**{EDITOR_NAMES[lane.algorithm]}** after {last['edits']} facts "
                            f"({lane.seconds:.0f} s of editing)")
            value = common.format_value
            column.caption(f"edited facts S {value(last['retention'].get('S'), 'score')} · untouched facts kept "
                           f"{value(last.get('heldout_kept'), 'percent')} · GE {value(last.get('GE'), 'bits')} "
                           f"(unedited {value(first.get('GE'), 'bits')})")
    st.markdown(f"##### What the model writes after *{common.escape(run.watch.prompt)}*")
    rows = {}
    for lane in run.lanes:
        for curve in lane.curves:
            rows.setdefault(curve["edits"], {"facts edited": curve["edits"]})[EDITOR_NAMES[lane.algorithm]] = \
                curve["text"].strip()
    st.dataframe([rows[k] for k in sorted(rows)], hide_index=True, key="lifelong_texts")
    st.download_button("Download the run (JSON)", json.dumps(run.to_dict(), indent=1, ensure_ascii=False),
                       file_name="emmet-lifelong.json", mime="application/json", icon=":material/download:",
                       on_click="ignore", key="lifelong_download")


session = common.require_session()
st.title("Lifelong editing")
st.caption("Edit fact after fact, batch after batch, never undoing, and watch what it does to the model: do the "
           "edited facts stay, do untouched facts survive, does the text stay fluent? Each editor works on its own "
           "copy of the original weights (not your edits, nor anyone else's), and the model is shared fairly: other "
           "sessions get their turn between batches.")
records = common.fact_source("lifelong", default_n=40)
left, middle, right = st.columns([2, 1, 1])
algorithms = left.pills("Editors (one or two)", list(EDITOR_NAMES), default=["memit", "encore"],
                        selection_mode="multi", format_func=EDITOR_NAMES.get, key="lifelong_editors")
batch = middle.number_input("Facts per batch", 1, 1000, 10, key="lifelong_batch")
every = right.number_input("Checkpoint every … facts", 1, 10_000, 10, key="lifelong_every")
prompt = st.text_input("Watched prompt", FIXED_PROMPT, key="lifelong_prompt",
                       help="Its continuation is generated at every checkpoint, so the effect reads in words.")
if len(algorithms or []) > 2:
    st.warning("Side by side works for two editors; the first two are used.")
classroom.editor_help(*list(algorithms or [])[:2])
shown = state.get("lifelong")
run = shown[1] if shown is not None and shown[0] == session.loaded.name else None
buttons = st.columns(5)
if buttons[0].button("New run", type="primary", icon=":material/add:", key="lifelong_start",
                     help="Set up a run with these facts and editors; then Run, or go One step at a time."):
    start(session, records or [], list(algorithms or [])[:2], int(batch), int(every), prompt)
    shown = state.get("lifelong")
    run = shown[1] if shown is not None else None
active = run is not None and run.status not in ("stopped", "done")
if buttons[1].button("One step", icon=":material/skip_next:", disabled=not active, key="lifelong_step"):
    run.status = "paused"
    step(run)
buttons[2].button("Run" if run is None or run.status != "paused" else "Resume", icon=":material/play_arrow:",
                  disabled=not active or run.status == "running", key="lifelong_run",
                  on_click=set_status, args=("running",))
buttons[3].button("Pause", icon=":material/pause:", disabled=not active or run.status != "running",
                  key="lifelong_pause", on_click=set_status, args=("paused",))
buttons[4].button("Stop", icon=":material/stop:", disabled=not active, key="lifelong_stop",
                  on_click=set_status, args=("stopped",))
if run is not None:
    if run.status == "running":
        step(run)
        if run.done:
            run.status = "done"
    render(run)
    if run.status == "running":  # the next unit of work after the page is drawn
        st.rerun()
