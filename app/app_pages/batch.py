"""Batch page: many facts at once with MEMIT or EMMET, from an uploaded file or sampled
from CounterFact, scored before and after. The batch is kept in the session (undo works)."""

import csv
import io
import json

import streamlit as st

from app_pages import classroom, common
from emmet_core.data import EvalRecord
from emmet_core.errors import InvalidRequestError
from emmet_core.hparams import EDITOR_NAMES
from emmet_core.studio import figures
from emmet_core.studio.judge import judge
from emmet_core.studio.uploads import MAX_FACTS
from emmet_core.studio.workflows import BatchReport, run_batch
from emmet_core.studio.workspace import Session

ALGORITHMS = {k: v for k, v in EDITOR_NAMES.items() if k != "rome"}  # batches: not ROME
state = st.session_state


def run(session: Session, records: list[EvalRecord], algorithm: str, chunk: int, gen_tokens: int) -> None:
    with common.readable_errors("The batch"):
        if not records:
            raise InvalidRequestError("no facts to edit")
        progress = common.Progress(timed=True)
        chunks = st.empty()
        report = run_batch(session, records, algorithm, chunk_size=chunk or None, gen_tokens=gen_tokens,
                           on_phase=progress, on_wait=progress.waiting,
                           on_chunk=lambda i, n: chunks.caption(f"Batch {i} of {n} applied"))
        progress.done(f"{len(records)} facts edited")
        state.batch_report = (session.id, report)
        st.rerun()


def csv_text(report: BatchReport) -> str:
    rows = report.rows()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def mark(row: dict[str, float], metric: str, margin: float) -> str:
    """The metric after the edit with a mark that agrees with it: ✗ when no prompt of
    the fact passed, ◐ when some did, else ✓ (or ✓? when the fact's mean margin is below
    the clear margin); the mean margin beside it."""
    mean = row.get(f"{metric}_margin", 0.0)
    if row[metric] == 0:
        symbol = "✗"
    elif row[metric] < 1:
        symbol = "◐"
    else:
        symbol = judge(0.0, mean, threshold=margin).symbol if mean > 0 else "✓?"
    return f"{row[metric]:.0%} {symbol} {mean:+.2f}"


def table(report: BatchReport, margin: float) -> list[dict]:
    """Per fact: known before?, then each metric after the edit with its margin (the
    downloads have everything)."""
    out = []
    for record, pre, post in zip(report.records, report.before, report.after):
        row = {"case": str(record.case_id), "prompt": record.request.text, "old": record.request.target_true,
               "new": record.request.target_new, "known before": "yes" if pre.get("ES") == 1.0 else ""}
        for metric in ("ES", "PS", "NS"):
            if metric in post:
                row[metric] = f"{common.format_value(pre.get(metric), 'share')} → {mark(post, metric, margin)}"
        out.append(row)
    return out


def weak_wins(rows: list[dict[str, float]], metric: str, margin: float) -> int:
    """Facts whose prompts all passed, by less than the clear margin on average."""
    return sum(r[metric] == 1 and r[f"{metric}_margin"] < margin for r in rows if f"{metric}_margin" in r)


def render(report: BatchReport) -> None:
    st.divider()
    pre, post = report.summary_before, report.summary_after
    margin = common.clear_margin()
    st.subheader(f"{report.record.label}")
    known = sum(r.get("ES") == 1.0 for r in report.before)
    if known:
        st.warning(f"{known} of {len(report.records)} facts were already answered the new way before the edit "
                   "(marked 'known before'): their success proves little.", icon=":material/info:")
    columns = st.columns(5)
    for column, metric in zip(columns, ("ES", "PS", "NS", "S", "GE")):
        if metric in post:
            change = post[metric] - pre.get(metric, 0.0)
            weak = weak_wins(report.after, metric, margin) if metric in ("ES", "PS", "NS") else 0
            column.metric(metric, common.format_value(post[metric], "bits" if metric == "GE" else "score"),
                          f"{change:+.1f}" if abs(change) >= 0.05 else None,
                          help=f"{weak} of the facts pass by less than the clear margin ({margin:g} nats)"
                          if weak else None)
            if weak:
                column.caption(f"{weak} weak (✓?)")
    left, right = st.columns([1, 1])
    with left:
        st.plotly_chart(classroom.for_screen(figures.summary_chart(pre, post)), key="batch_summary")
        common.good("ES and PS near 100, NS near the unedited model's, GE within ~0.3 bits of it.")
    labels = [f"{r.request.subject} → {r.request.target_new}" for r in report.records]
    with right:
        st.plotly_chart(classroom.for_screen(figures.batch_success_chart(labels, report.before, report.after)),
                        key="batch_success")
        common.good("green ES and PS in every row, and NS as green as before the edit (hover: before → after).")
    st.caption("Good: ES and PS near 100 with clear margins (✓, not ✓?), NS near its value before the edit, "
               "GE within about 0.3 bits of before.")
    st.dataframe(table(report, margin), hide_index=True, column_config={
        m: st.column_config.TextColumn(help=f"{m} before → after: ✓ every prompt passed, ✓? all passed but the "
                                            "fact's mean margin is below the clear margin, ◐ some passed, ✗ none; "
                                            "then the mean margin (nats per token)")
        for m in ("ES", "PS", "NS")})
    left, right = st.columns(2)
    left.download_button("Download results (JSON)", json.dumps(report.to_dict(), indent=2, ensure_ascii=False),
                         file_name="emmet-batch.json", mime="application/json", icon=":material/download:",
                         on_click="ignore")
    right.download_button("Download per-fact rows (CSV)", csv_text(report), file_name="emmet-batch.csv",
                          mime="text/csv", icon=":material/download:", on_click="ignore")


session = common.require_session()
st.title("Batch edits")
st.caption("Many facts in one MEMIT or EMMET solve, scored before and after on their prompts, paraphrases and "
           "neighbours. The batch is added to your session's history (undo it there).")
records = common.fact_source("batch")
left, middle, right = st.columns(3)
algorithm = left.segmented_control("Editor", list(ALGORITHMS), default="emmet", format_func=ALGORITHMS.get,
                                   key="batch_algorithm", required=True)
chunk = middle.number_input("Facts per solve (0: all at once)", 0, MAX_FACTS, 0, key="batch_chunk",
                            help="Smaller batches are applied one after the other and all kept.")
gen_tokens = right.number_input("Generated tokens per text (GE)", 0, 200, 0, step=10, key="batch_gen_tokens",
                                help="0 skips generation (faster).")
with left:
    classroom.editor_help(algorithm or "emmet")
if st.button("Run the batch", type="primary", icon=":material/play_arrow:", disabled=not records, key="run_batch"):
    run(session, records or [], algorithm or "emmet", int(chunk), int(gen_tokens))
shown = state.get("batch_report")
if shown is not None and shown[0] == session.id:
    render(shown[1])
