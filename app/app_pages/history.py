"""History page: this session's edits, undo and reset, the edit log, a prompt put to the
original and the edited model side by side, and the edited model to download."""

import time
from pathlib import Path

import streamlit as st

from app_pages import classroom, common
from emmet_core.studio.workspace import Session

state = st.session_state


def rows(session: Session) -> list[dict]:
    out = []
    for number, record in enumerate(session.records, start=1):
        summary = record.summary
        p_new = summary.get("p_new")
        out.append({
            "#": number,
            "time": time.strftime("%H:%M:%S", time.localtime(record.created)),
            "edit": record.label,
            "layers": ", ".join(map(str, record.layers)),
            "‖Δ‖": ", ".join(common.format_value(v, "norm") for v in record.norms.values()),
            "P(new) before → after": (f"{common.format_value(p_new[0])} → {common.format_value(p_new[1])}"
                                      if p_new else common.format_value(None)),
            "seconds": round(record.seconds.get("total", 0.0), 1),
        })
    return out


def undo(session: Session) -> None:
    with common.readable_errors("Undo"):
        record = session.undo()
        state.history_message = f"Undone: {record.label}"


def ask_reset() -> None:
    state["_confirm_reset"] = True


def keep_edits() -> None:
    state.pop("_confirm_reset", None)


def reset(session: Session) -> None:
    state.pop("_confirm_reset", None)
    session.reset()
    state.history_message = "Back to the original model."


def export(session: Session) -> None:
    st.markdown("##### Export the edited model")
    st.caption("A safetensors checkpoint directory (config, weights, tokenizer) that transformers loads with "
               "`AutoModelForCausalLM.from_pretrained(path)`.")
    left, right = st.columns(2)
    left.download_button("Download the edited model (.zip)", data=session.export_zip,
                         file_name=f"{Path(session.loaded.name).name or 'model'}-{len(session.records)}-edits.zip",
                         mime="application/zip", icon=":material/download:", disabled=not session.records,
                         on_click="ignore", help="Built when you click; for large models prefer saving on the server.")
    if right.button("Save on the server", icon=":material/save:", disabled=not session.records, key="save_model",
                    help="Into the server's export folder (EMMET_EXPORT_DIR), in a new directory named after the "
                         "model, the edits and the time."):
        with common.readable_errors("Saving the model"), st.spinner("Writing safetensors…"):
            path = session.save_export()
            st.success(f"Saved as {path.name} in the server's export folder")


session = common.require_session()
st.title("History")
st.caption("Every edit applied in this browser session, oldest first. They live only in this session: "
           "other users of this server see the original model.")
message = state.pop("history_message", None)
if message:
    st.success(message)
if not session.records:
    st.info("No edits yet. Apply one on the Edit page (or run a batch).")
else:
    st.dataframe(rows(session), hide_index=True)
left, middle, right = st.columns(3)
left.button("Undo the last edit", on_click=undo, args=(session,), disabled=not session.records,
            icon=":material/undo:", key="undo")
middle.button("Reset to the original model", on_click=ask_reset, disabled=not session.records,
              icon=":material/restart_alt:", key="reset", help="Asks first: a reset forgets every edit.")
right.download_button("Download the edit log (JSON)", session.log_json(), file_name="emmet-edit-log.json",
                      mime="application/json", icon=":material/data_object:", on_click="ignore")
st.divider()
classroom.ask_box(session, key="history_ask")
if state.get("_confirm_reset") and session.records:
    with st.container(border=True):
        count = len(session.records)
        st.warning(f"Forget all {count} edit{'s' if count != 1 else ''} of this session? This cannot be undone "
                   "(download the edit log or the model first if you need them).", icon=":material/warning:")
        yes, no = st.columns(2)
        yes.button("Yes, reset", on_click=reset, args=(session,), type="primary", key="reset_confirm")
        no.button("Keep my edits", on_click=keep_edits, key="reset_cancel")
st.divider()
export(session)
