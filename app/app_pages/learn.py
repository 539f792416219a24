"""Learn page: the preservation–memorization objective, the three closed forms, and live
pictures of this session's last edit."""

import streamlit as st

from app_pages import common
from emmet_core.studio import figures
from emmet_core.studio.anatomy import UpdatePicture, pictures, spectrum
from emmet_core.studio.workspace import EditRecord, Session

state = st.session_state


def theory() -> None:
    st.markdown(
        "Each editor changes one matrix per edited layer: the MLP's output projection $W$, which maps the MLP's "
        "hidden vector $k$ (the **key**, size $d_k$) to the residual stream (size $d$). A fact is stored as a "
        "key–value pair: the key $k^*$ is what the layer sees at the subject's last token, the value $v^*$ is "
        "an output that makes the model say the new object. All three keep the outputs for the keys of "
        "existing knowledge $K_0$ (**preservation**) while writing the new pairs $(K_E, V_E)$ "
        "(**memorization**); $C_0 = \\mathbb{E}[k k^\\top]$ summarises $K_0$ over a text corpus.")
    st.latex(r"\hat W = \arg\min_{\hat W}\ \underbrace{\lVert \hat W K_0 - W_0 K_0 \rVert^2}_{\text{preservation}}"
             r"\quad\text{such that}\quad \underbrace{\hat W K_E = V_E}_{\text{memorization}}"
             r"\qquad\text{(ROME, EMMET)}")
    st.latex(r"\hat W = \arg\min_{\hat W}\ \lambda\,\lVert \hat W K_0 - W_0 K_0 \rVert^2"
             r" + \lVert \hat W K_E - V_E \rVert^2\qquad\text{(MEMIT: least squares)}")
    st.markdown("With $R = V_E - W_0 K_E$ (what the layer must add), each has a closed form:")
    forms = (
        ("ROME", "one fact, equality", r"\Delta = \frac{(v^* - W_0 k^*)\,(C_0^{-1} k^*)^\top}{k^{*\top} C_0^{-1} k^*}",
         "Rank one; afterwards exactly $\\hat W k^* = v^*$."),
        ("MEMIT", "a batch, least squares", r"\Delta = R\,K_E^\top\,\bigl(\lambda C_0 + K_E K_E^\top\bigr)^{-1}",
         "Rank ≤ N, spread over several layers; the targets are met only approximately."),
        ("EMMET", "a batch, equality",
         r"\Delta = R\,\bigl(K_E^\top C_0^{-1} K_E + \rho I\bigr)^{-1} K_E^\top C_0^{-1}",
         "Rank ≤ N. With ρ = 0 every target is met exactly; ρ > 0 keeps big batches stable. "
         "ROME is EMMET with N = 1 and ρ = 0."),
    )
    for name, kind, formula, note in forms:
        left, right = st.columns([1, 2], vertical_alignment="center")
        left.markdown(f"**{name}**: {kind}")
        left.caption(note)
        right.latex(formula)


def c0_spectrum(session: Session, record: EditRecord, layer: int):
    """Eigenvalues of the C0 this edit used, computed once per browser session."""
    hp = record.results[0].hparams
    key = (session.loaded.fingerprint, layer, *hp.stats_settings)
    spectra = state.setdefault("c0_spectra", {})
    if key not in spectra:
        cov = session.shared.covariance(hp, layer)
        if cov is None:
            return None
        with st.spinner("Eigenvalues of C0…"):
            spectra[key] = spectrum(cov)
    return spectra[key]


def live(session: Session) -> None:
    st.subheader("Your last edit, inside the matrix")
    if not session.records:
        st.info("Apply an edit on the Edit page (or a batch) to see its keys, values and update here.")
        return
    records = session.records
    labels = [f"{i}. {r.label}" for i, r in enumerate(records, start=1)]
    chosen = st.selectbox("Edit", labels, index=len(labels) - 1, key="learn_record")
    record: EditRecord = records[labels.index(chosen)]
    shots = pictures(record.results)
    if len(shots) > 1:
        names = [s.label for s in shots]
        shot = shots[names.index(st.selectbox("Update", names, key="learn_update"))]
    else:
        shot = shots[0]
    draw(session, record, shot)


def draw(session: Session, record: EditRecord, shot: UpdatePicture) -> None:
    facts = [f"{r.subject} → {r.target_new}" for r in record.requests]
    rows = facts if len(facts) == shot.n_facts else [f"fact {i + 1}" for i in range(shot.n_facts)]
    st.markdown(f"**{shot.label}**: {shot.n_facts} key{'s' if shot.n_facts > 1 else ''}, Δ of shape "
                f"{tuple(shot.delta.shape)}, numerical rank **{shot.rank}** (at most {shot.n_facts}).")
    left, right = st.columns(2)
    left.plotly_chart(figures.heatmap(shot.keys.T, "Keys k* (one row per fact)", "MLP hidden unit", rows),
                      key="learn_keys")
    right.plotly_chart(figures.heatmap(shot.residuals.T, "Residuals r = v* − W k* (what this layer adds)",
                                       "residual-stream dimension", rows), key="learn_residuals")
    left, right = st.columns(2)
    left.plotly_chart(figures.singular_value_chart(shot.singular_values, shot.rank, max(12, 2 * shot.n_facts)),
                      key="learn_singular")
    right.plotly_chart(figures.residual_chart(rows, shot.residual_before.tolist(), shot.residual_after.tolist()),
                       key="learn_residual_norms")
    hp = record.results[0].hparams
    values = c0_spectrum(session, record, shot.layer)
    if values is not None:
        st.plotly_chart(figures.spectrum_chart(values, shot.layer), key="learn_spectrum")
        st.caption(f"C0 from {hp.stats_tokens:,} tokens of {hp.stats_corpus}. Its condition number here is "
                   f"{float(values[0] / max(float(values[-1]), 1e-300)):.2e}: directions that rarely occur in "
                   "text get large weight in C0⁻¹, which is where the edit writes.")


session = common.require_session()
st.title("How the editors work")
theory()
st.divider()
live(session)
