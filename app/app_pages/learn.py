"""Learn page: the preservation–memorization objective, the closed forms of the five editors,
and live pictures of this session's last edit. Symbols as everywhere in the app: m the
covariance weight, λ EMMET's ridge factor, ρ = m·λ, α and P AlphaEdit's, μ ENCORE's."""

import streamlit as st

from app_pages import classroom, common
from emmet_core.studio import figures
from emmet_core.studio.anatomy import UpdatePicture, pictures, spectrum
from emmet_core.studio.workspace import EditRecord, Session

state = st.session_state


SYMBOLS = (
    ("$m$", "covariance weight: how much keeping $C_0$'s keys counts (MEMIT's λ in its paper)",
     "Covariance weight m", "mom2_update_weight"),
    ("$\\lambda$", "EMMET's ridge factor", "EMMET λ", "emmet_lambda"),
    ("$\\rho = m\\lambda$", "EMMET's effective ridge (scaling $C_0$ by $m$ and adding $\\lambda I$)",
     "from the two above", "HParams.ridge"),
    ("$P$, $\\alpha$", "AlphaEdit's null-space projector and its ridge", "Null-space threshold (P)",
     "nullspace_threshold, alphaedit_l2"),
    ("$\\mu$", "ENCORE's norm weight", "Norm weight μ", "encore_norm_weight"),
)


def theory() -> None:
    st.markdown(
        "Each editor changes one matrix per edited layer: the MLP's output projection $W$, which maps the MLP's "
        "hidden vector $k$ (the **key**, size $d_k$) to the residual stream (size $d$). A fact is stored as a "
        "key–value pair: the key $k^*$ is what the layer sees at the subject's last token, the value $v^*$ is "
        "an output that makes the model say the new object. All of them keep the outputs for the keys of "
        "existing knowledge $K_0$ (**preservation**) while writing the new pairs $(K_E, V_E)$ "
        "(**memorization**); $C_0 = \\mathbb{E}[k k^\\top]$ summarises $K_0$ over a text corpus.")
    st.latex(r"\hat W = \arg\min_{\hat W}\ \underbrace{\lVert \hat W K_0 - W_0 K_0 \rVert^2}_{\text{preservation}}"
             r"\quad\text{such that}\quad \underbrace{\hat W K_E = V_E}_{\text{memorization}}"
             r"\qquad\text{(ROME, EMMET)}")
    st.latex(r"\hat W = \arg\min_{\hat W}\ m\,\lVert \hat W K_0 - W_0 K_0 \rVert^2"
             r" + \lVert \hat W K_E - V_E \rVert^2\qquad\text{(MEMIT: least squares)}")
    st.markdown("With $R = V_E - W_0 K_E$ (what the layer must add), each has a closed form:")
    forms = (
        ("ROME", "one fact, equality", r"\Delta = \frac{(v^* - W_0 k^*)\,(C_0^{-1} k^*)^\top}{k^{*\top} C_0^{-1} k^*}",
         "Rank one; afterwards exactly $\\hat W k^* = v^*$."),
        ("MEMIT", "a batch, least squares", r"\Delta = R\,K_E^\top\,\bigl(m\,C_0 + K_E K_E^\top\bigr)^{-1}",
         "Rank ≤ N, spread over several layers; the targets are met only approximately."),
        ("EMMET", "a batch, equality",
         r"\Delta = R\,\bigl(K_E^\top C_0^{-1} K_E + \rho I\bigr)^{-1} K_E^\top C_0^{-1},\quad \rho = m\lambda",
         "Rank ≤ N. With ρ = 0 every target is met exactly; ρ > 0 keeps big batches stable. "
         "ROME is EMMET with N = 1 and ρ = 0."),
        ("AlphaEdit", "a batch, in the null space",
         r"\Delta = R\,K_E^\top P\,\bigl(K_p K_p^\top P + K_E K_E^\top P + \alpha I\bigr)^{-1}",
         "P projects onto the directions of C0 with near-zero eigenvalues, so Δ k = 0 for preserved keys; "
         "K_p are the keys of earlier edits, kept too."),
        ("ENCORE", "a batch, norm-penalised",
         r"\Delta = \bigl(R\,K_E^\top - \mu D\bigr)\bigl(m\,C_0 + K_E K_E^\top + \mu I\bigr)^{-1},\quad D = W - W_0",
         "MEMIT plus μ‖W − W₀‖²: each edit pulls the matrix back towards its original. The v* optimisation "
         "stops once every target token is the most probable one on every prompt (most-probable early "
         "stopping)."),
    )
    for name, kind, formula, note in forms:
        left, right = st.columns([1, 2], vertical_alignment="center")
        left.markdown(f"**{name}**: {kind}")
        left.caption(note)
        right.latex(formula)
    with st.expander("The symbols and where to set them"):
        st.markdown("| symbol | meaning | Edit page, Advanced | hyper-parameter |\n|---|---|---|---|\n" + "\n".join(
            f"| {symbol} | {meaning} | {label} | `{name}` |" for symbol, meaning, label, name in SYMBOLS))


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
    with left:
        st.plotly_chart(classroom.for_screen(figures.heatmap(shot.keys.T, "Keys k* (one row per fact)",
                                                          "MLP hidden unit", rows)), key="learn_keys")
        common.good("each fact's key is its own pattern; two nearly identical rows are hard to edit apart.")
    with right:
        st.plotly_chart(classroom.for_screen(figures.heatmap(
            shot.residuals.T, "Residuals r = v* − W k* (what this layer adds)", "residual-stream dimension", rows)),
            key="learn_residuals")
        common.good("moderate rows; a much larger row than the others needs a large Δ and disturbs more.")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(classroom.for_screen(figures.singular_value_chart(
            shot.singular_values, shot.rank, max(12, 2 * shot.n_facts))), key="learn_singular")
        common.good(f"{shot.n_facts} bar{'s' if shot.n_facts > 1 else ''} above the rest (one per fact): the "
                    "update has rank N: it acts on N directions of the keys only.")
    with right:
        st.plotly_chart(classroom.for_screen(figures.residual_chart(rows, shot.residual_before.tolist(),
                                                                 shot.residual_after.tolist())),
                        key="learn_residual_norms")
        common.good("after ≈ 0 for ROME and EMMET (equality, up to EMMET's ridge ρ = m·λ); MEMIT, AlphaEdit and "
                    "ENCORE only shrink it (least squares: keeping C0's keys counts too).")
    hp = record.results[0].hparams
    values = c0_spectrum(session, record, shot.layer)
    if values is not None:
        st.plotly_chart(classroom.for_screen(figures.spectrum_chart(values, shot.layer)), key="learn_spectrum")
        common.good("a smooth decay over several orders of magnitude; Δ is shaped by C0⁻¹, so it writes mostly "
                    "in the rare directions, where it disturbs other keys least.")
        st.caption(f"C0 from {hp.stats_tokens:,} tokens of {hp.stats_corpus}. Its condition number here is "
                   f"{float(values[0] / max(float(values[-1]), 1e-300)):.2e}: directions that rarely occur in "
                   "text get large weight in C0⁻¹, which is where the edit writes.")


session = common.require_session()
st.title("How the editors work")
theory()
st.divider()
live(session)
