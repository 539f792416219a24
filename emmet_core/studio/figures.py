"""Plotly figures of one edit, a comparison, a batch run and the anatomy of an update.

Pure functions from numbers to ``go.Figure`` (no Streamlit), so the app stays thin and
the figures can be checked in tests. One colour per meaning throughout: the new object,
the old object, before and after, and one colour per algorithm.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .display import format_probability
from .judge import CLEAR_MARGIN
from .workflows import CompareRow, PromptScore

NEW, OLD = "#e4572e", "#4c78a8"  # the new object, the old (true) object
BEFORE, AFTER = "#b8c2cc", "#2a9d8f"
ALGORITHM_COLOURS = {"unedited": "#9aa5b1", "rome": "#2ca02c", "memit": "#1f77b4", "emmet": "#d62728",
                     "alphaedit": "#9467bd", "encore": "#ff7f0e"}
PHASES = ("prepare", "stats", "templates", "keys", "values", "solve")
SCORES = ("ES", "PS", "NS", "S")


def _layout(fig: go.Figure, title: str, height: int = 330, **extra: object) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0, "xanchor": "left", "y": 1, "yref": "container",
                             "yanchor": "top", "pad": {"t": 12}, "font": {"size": 15}},
                      height=height, margin={"l": 10, "r": 10, "t": 50, "b": 10}, template="plotly_white",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
                      **extra)
    return fig


def wrap(text: str, width: int = 42, lines: int = 2) -> str:
    """A prompt as a short multi-line axis label."""
    parts = textwrap.wrap(text, width) or [""]
    if len(parts) > lines:
        parts = [*parts[: lines - 1], textwrap.shorten(" ".join(parts[lines - 1 :]), width, placeholder=" …")]
    return "<br>".join(parts)


def _pct(p: float) -> str:
    return format_probability(p)


# -- lecture mode --------------------------------------------------------------------------
PLOTLY_FONT = 12  # plotly's default font size, which every unset size inherits


def scale_for_projector(fig: go.Figure, factor: float = 1.5) -> go.Figure:
    """A copy of ``fig`` with every font (titles, axes, ticks, legend, panel titles, bar
    labels) ``factor`` times larger, and the figure and its margins as much taller, so
    that it reads from the back of a lecture hall. The data are untouched."""
    out = go.Figure(fig)
    layout = out.layout
    out.update_layout(font_size=(layout.font.size or PLOTLY_FONT) * factor)
    fonts = [layout.title.font, layout.legend.font, *(a.font for a in layout.annotations)]
    for axis in (*out.select_xaxes(), *out.select_yaxes()):
        fonts += [axis.tickfont, axis.title.font]
    fonts += [trace.textfont for trace in out.data if "textfont" in trace]
    for font in fonts:
        if font.size is not None:  # unset sizes follow the layout's font, scaled above
            font.size *= factor
    if layout.height is not None:
        out.update_layout(height=round(layout.height * factor))
    margin = {side: round(getattr(layout.margin, side) * factor) for side in "lrtb"
              if getattr(layout.margin, side) is not None}
    if margin:
        out.update_layout(margin=margin)
    return out


# -- Edit page -----------------------------------------------------------------------------
def prompt_chart(before: PromptScore, after: PromptScore) -> go.Figure:
    """P(new) and P(old) on the edited prompt, before and after."""
    fig = go.Figure()
    for name, colour, values in ((f"new: {before.new}", NEW, (before.p_new, after.p_new)),
                                 (f"old: {before.true}", OLD, (before.p_true, after.p_true))):
        fig.add_bar(x=["before", "after"], y=list(values), name=name, marker_color=colour,
                    text=[_pct(v) for v in values], textposition="outside", cliponaxis=False)
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", title="probability")
    return _layout(fig, "Probability on the prompt", barmode="group")


def paraphrase_chart(before: Sequence[PromptScore], after: Sequence[PromptScore],
                     threshold: float = CLEAR_MARGIN) -> go.Figure:
    """P(new) per paraphrase before and after; each title carries the judgement and its
    margin (:mod:`judge`): ✓ clear, ✓? by less than ``threshold``, ✗ failed."""
    titles = [f"{a.as_new(threshold).label()} {textwrap.shorten(a.prompt, 60, placeholder=' …')}  ·  after: "
              f"new {_pct(a.p_new)} {'>' if a.prefers_new else '≤'} old {_pct(a.p_true)}" for a in after]
    return _prompt_rows("Paraphrases: P(new object)", titles, [
        ("P(new) before", BEFORE, [b.p_new for b in before]), ("P(new) after", NEW, [a.p_new for a in after])])


def neighbour_chart(before: Sequence[PromptScore], after: Sequence[PromptScore],
                    threshold: float = CLEAR_MARGIN) -> go.Figure:
    """P(true object) of each neighbour before and after: it should not move. Titles
    carry the judgement of keeping the neighbour's own object, with its margin."""
    titles = [f"{a.as_kept(threshold).label()} {textwrap.shorten(a.prompt, 60, placeholder=' …')} → {a.true}"
              + ("  ·  now prefers the new object" if a.prefers_new else "") for a in after]
    return _prompt_rows("Neighbours: P(their own object)", titles, [
        ("before", BEFORE, [b.p_true for b in before]), ("after", OLD, [a.p_true for a in after])])


def _prompt_rows(title: str, prompts: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]]) -> go.Figure:
    """One small panel per prompt, its text as the panel title (long prompts stay
    readable and the bars get the full width)."""
    n = max(len(prompts), 1)
    height = 90 + 78 * n
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=min(34 / height, 0.9 / n),
                        subplot_titles=list(prompts))
    for row in range(len(prompts)):
        for name, colour, values in series:
            fig.add_bar(y=[name], x=[values[row]], orientation="h", marker_color=colour, name=name,
                        legendgroup=name, showlegend=row == 0, text=[_pct(values[row])], textposition="outside",
                        cliponaxis=False, row=row + 1, col=1)
        fig.update_yaxes(showticklabels=False, autorange="reversed", row=row + 1, col=1)
    for annotation in fig.layout.annotations:
        annotation.update(x=0, xanchor="left", font={"size": 12})
    fig.update_xaxes(range=[0, 1.12], tickformat=".0%")
    _layout(fig, title, height=height, barmode="group", bargap=0.15)
    # The legend goes between the figure title and the first prompt, clear of both.
    fig.update_layout(margin={"t": 84}, legend={"y": 1 + 30 / (height - 94), "yanchor": "bottom"})
    return fig


def entropy_chart(prompts: Sequence[str], before: Sequence[float], after: Sequence[float]) -> go.Figure:
    """Generation entropy of each sampled text (drops when text turns repetitive)."""
    labels = [wrap(p, 28) for p in prompts]
    fig = go.Figure()
    fig.add_bar(x=labels, y=list(before), name="before", marker_color=BEFORE,
                text=[f"{v:.2f}" for v in before], textposition="outside", cliponaxis=False)
    fig.add_bar(x=labels, y=list(after), name="after", marker_color=AFTER,
                text=[f"{v:.2f}" for v in after], textposition="outside", cliponaxis=False)
    fig.update_yaxes(title="bits", rangemode="tozero")
    return _layout(fig, "Generation entropy", barmode="group")


def phase_chart(seconds: dict[str, float]) -> go.Figure:
    """Seconds per phase of the edit, in the order they run."""
    phases = [p for p in PHASES if seconds.get(p, 0.0) > 0] + [p for p in seconds if p not in (*PHASES, "total")]
    values = [seconds[p] for p in phases]
    fig = go.Figure(go.Bar(y=phases, x=values, orientation="h", marker_color=AFTER,
                           text=[f"{v:.2f} s" for v in values], textposition="outside", cliponaxis=False))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title="seconds", range=[0, max(values, default=1.0) * 1.25])
    return _layout(fig, f"Time per phase (total {seconds.get('total', sum(values)):.1f} s)", height=260)


def norm_chart(norms: dict[int, float]) -> go.Figure:
    """‖Δ‖_F of each edited layer."""
    layers = [f"layer {layer}" for layer in norms]
    fig = go.Figure(go.Bar(x=layers, y=list(norms.values()), marker_color=NEW,
                           text=[f"{v:.3g}" for v in norms.values()], textposition="outside", cliponaxis=False))
    fig.update_yaxes(title="‖Δ‖", rangemode="tozero")
    return _layout(fig, "Size of the update per layer", height=260)


# -- Compare page --------------------------------------------------------------------------
def _colour(algorithm: str) -> str:
    return ALGORITHM_COLOURS.get(algorithm, "#7f7f7f")


def compare_scores_chart(rows: Sequence[CompareRow]) -> go.Figure:
    """ES, PS, NS and S (×100) per algorithm, the unedited model first."""
    fig = go.Figure()
    for row in rows:
        if row.error is None:
            values = [row.metrics.get(m) for m in SCORES]
            fig.add_bar(x=list(SCORES), y=values, name=row.algorithm.upper() if row.algorithm != "unedited"
                        else "unedited", marker_color=_colour(row.algorithm),
                        text=[f"{v:.0f}" if v is not None else "" for v in values], textposition="outside",
                        cliponaxis=False)
    fig.update_yaxes(range=[0, 110], title="score (×100)")
    return _layout(fig, "Efficacy, generalisation, specificity and their harmonic mean", barmode="group")


def compare_details_chart(rows: Sequence[CompareRow]) -> go.Figure:
    """GE, P(new) vs P(old), ‖Δ‖ and time per algorithm, side by side."""
    ok = [r for r in rows if r.error is None]
    edited = [r for r in ok if r.algorithm != "unedited"]
    both = f'<span style="color:{NEW}">P(new)</span> / <span style="color:{OLD}">P(old)</span>'
    fig = make_subplots(rows=1, cols=4, subplot_titles=("GE (bits)", both, "‖Δ‖", "seconds"),
                        horizontal_spacing=0.08)
    names = [r.algorithm.upper() if r.algorithm != "unedited" else "unedited" for r in ok]
    colours = [_colour(r.algorithm) for r in ok]
    fig.add_bar(x=names, y=[r.metrics.get("GE") for r in ok], marker_color=colours, showlegend=False, row=1, col=1)
    fig.add_bar(x=names, y=[_mean(r.p_new) for r in ok], name="P(new)", marker_color=NEW, showlegend=False,
                row=1, col=2)
    fig.add_bar(x=names, y=[_mean(r.p_true) for r in ok], name="P(old)", marker_color=OLD, showlegend=False,
                row=1, col=2)
    edited_names = [r.algorithm.upper() for r in edited]
    edited_colours = [_colour(r.algorithm) for r in edited]
    fig.add_bar(x=edited_names, y=[r.delta_norm for r in edited], marker_color=edited_colours, showlegend=False,
                row=1, col=3)
    fig.add_bar(x=edited_names, y=[r.seconds.get("total", 0.0) for r in edited], marker_color=edited_colours,
                showlegend=False, row=1, col=4)
    fig.update_yaxes(range=[0, 1], tickformat=".0%", row=1, col=2)
    _layout(fig, "", height=300, barmode="group")
    fig.update_layout(margin={"t": 40})
    return fig


# One colour per kind of prompt; the keys are :data:`emmet_core.evaluate.MARGINS`.
MARGIN_KINDS = {"ES_margin": ("rewrite prompt", NEW), "PS_margin": ("paraphrases (mean)", "#f4a261"),
                "NS_margin": ("neighbours (mean, own object)", OLD)}


def margin_chart(facts: Sequence[Mapping[str, Any]], threshold: float = CLEAR_MARGIN) -> go.Figure:
    """Per editor, every fact's margin in nats (the wanted object's mean per-token
    log-probability minus the other's: :mod:`judge`) as points over a box, one box per
    kind of prompt. Above the dashed line a win is clear (✓), between it and 0 weak (✓?),
    below 0 failed (✗). ``facts``: rows with ``editor`` and the margins (missing ones are
    left out), e.g. :meth:`comparison.CompareRun.fact_rows`."""
    fig = go.Figure()
    for key, (label, colour) in MARGIN_KINDS.items():
        shown = [f for f in facts if f.get(key) is not None]
        if not shown:
            continue
        fig.add_box(x=[_editor(f["editor"]) for f in shown], y=[f[key] for f in shown], name=label,
                    marker_color=colour, boxpoints="all", jitter=0.5, pointpos=0, line_width=1,
                    text=[_fact_label(f) for f in shown], hovertemplate="%{text}<br>%{y:+.2f} nats<extra></extra>")
    fig.add_hline(y=0, line_color="#6b7280", line_width=1)
    fig.add_hline(y=threshold, line_dash="dash", line_color="#2a9d8f",
                  annotation_text=f"clear margin {threshold:g} nats", annotation_position="top left")
    fig.update_yaxes(title="margin (nats)", zeroline=False)
    return _layout(fig, "Margin per fact: the wanted object's log-probability minus the other's", height=400,
                   boxmode="group")


def _editor(algorithm: str) -> str:
    return algorithm.upper() if algorithm != "unedited" else "unedited"


def _fact_label(fact: Mapping[str, Any]) -> str:
    repeat = f" · repeat {fact['repeat']}" if "repeat" in fact else ""
    return f"case {fact.get('case_id')}{repeat}: {textwrap.shorten(str(fact.get('prompt', '')), 60)}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- Batch page ----------------------------------------------------------------------------
def batch_success_chart(labels: Sequence[str], before: Sequence[dict], after: Sequence[dict]) -> go.Figure:
    """Per fact: ES, PS and NS after the edit (green: success), with the unedited values
    in the hover text."""
    metrics = [m for m in ("ES", "PS", "NS") if any(m in row for row in after)]
    z = [[row.get(m) for m in metrics] for row in after]
    hover = [[f"{m}: {b.get(m, float('nan')):.2f} → {a.get(m, float('nan')):.2f}" for m in metrics]
             for b, a in zip(before, after)]
    short = [textwrap.shorten(label, 48, placeholder=" …") for label in labels]
    fig = go.Figure(go.Heatmap(z=z, x=metrics, y=short, zmin=0, zmax=1, text=hover, hoverinfo="text+y",
                               colorscale=[[0, "#e76f51"], [0.5, "#f4e285"], [1, "#2a9d8f"]], xgap=2, ygap=2,
                               colorbar={"title": "after", "len": 0.8}))
    fig.update_yaxes(autorange="reversed", tickfont={"size": 11})
    return _layout(fig, "Success per edit (after)", height=min(1400, 120 + 24 * len(labels)))


def summary_chart(pre: dict[str, float], post: dict[str, float]) -> go.Figure:
    """Summary scores (×100) of the unedited and the edited model."""
    names = [m for m in SCORES if m in post]
    fig = go.Figure()
    for label, colour, values in (("unedited", BEFORE, pre), ("edited", AFTER, post)):
        ys = [values.get(m) for m in names]
        fig.add_bar(x=names, y=ys, name=label, marker_color=colour,
                    text=[f"{v:.1f}" if v is not None else "" for v in ys], textposition="outside", cliponaxis=False)
    fig.update_yaxes(range=[0, 110], title="score (×100)")
    return _layout(fig, "Summary", barmode="group")


# -- Learn page ----------------------------------------------------------------------------
def heatmap(matrix: torch.Tensor, title: str, x_title: str, row_labels: Sequence[str]) -> go.Figure:
    """Rows of ``matrix`` (one per fact) as coloured strips, centred on zero."""
    data = matrix.detach().to("cpu", torch.float64)
    bound = float(data.abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(z=data.tolist(), y=list(row_labels), zmin=-bound, zmax=bound, colorscale="RdBu",
                               reversescale=True, colorbar={"len": 0.9}))
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=max(220, 120 + 34 * len(row_labels)))


def singular_value_chart(values: torch.Tensor, rank: int, show: int = 12) -> go.Figure:
    """The largest singular values of Δ on a log axis; the rank is the count above noise."""
    top = values[:show].tolist()
    colours = [NEW if i < rank else BEFORE for i in range(len(top))]
    fig = go.Figure(go.Bar(x=[str(i + 1) for i in range(len(top))], y=[max(v, 1e-12) for v in top],
                           marker_color=colours))
    fig.update_yaxes(type="log", title="σ", exponentformat="power")
    fig.update_xaxes(title="index")
    return _layout(fig, f"Singular values of Δ (numerical rank {rank})", height=300)


def residual_chart(labels: Sequence[str], before: Sequence[float], after: Sequence[float]) -> go.Figure:
    """‖Ŵk − v‖ per fact before (= ‖r‖) and after the update."""
    short = [textwrap.shorten(label, 30, placeholder=" …") for label in labels]
    fig = go.Figure()
    fig.add_bar(x=short, y=list(before), name="before: ‖W k − v‖", marker_color=BEFORE)
    fig.add_bar(x=short, y=[max(v, 1e-12) for v in after], name="after: ‖(W+Δ) k − v‖", marker_color=AFTER)
    fig.update_yaxes(type="log", title="norm", exponentformat="power")
    return _layout(fig, "Does the edited matrix hit the target value?", height=300, barmode="group")


def spectrum_chart(eigenvalues: torch.Tensor, layer: int) -> go.Figure:
    """Eigenvalues of C0: a few directions dominate, and C0⁻¹ favours the rare ones."""
    values = eigenvalues.tolist()
    fig = go.Figure(go.Scatter(x=list(range(1, len(values) + 1)), y=[max(v, 1e-12) for v in values],
                               mode="lines", line={"color": OLD}))
    fig.update_yaxes(type="log", title="eigenvalue", exponentformat="power")
    fig.update_xaxes(title="index (descending)")
    return _layout(fig, f"Spectrum of C0 = E[k kᵀ] at layer {layer}", height=300)


# -- Lifelong page ---------------------------------------------------------------------------
LIFELONG_PANELS = (
    ("Edited facts: S", lambda c: c["retention"].get("S")),
    ("Untouched facts kept (%)", lambda c: c.get("heldout_kept")),
    ("Generation entropy (bits)", lambda c: c.get("GE")),
    ("Perplexity of held-out text", lambda c: c.get("perplexity")),
    ("‖W − W₀‖, all edited layers", lambda c: sum(v * v for v in c["delta_norms"].values()) ** 0.5),
)


def lifelong_chart(lanes: Sequence[tuple[str, Sequence[dict]]]) -> go.Figure:
    """The checkpoints of a lifelong run: one panel per measure, one line per editor,
    facts edited so far on x. ``lanes``: (algorithm, checkpoints) pairs."""
    fig = make_subplots(rows=1, cols=len(LIFELONG_PANELS), subplot_titles=[t for t, _ in LIFELONG_PANELS],
                        horizontal_spacing=0.05)
    for algorithm, curves in lanes:
        for col, (_, read) in enumerate(LIFELONG_PANELS, start=1):
            points = [(c["edits"], read(c)) for c in curves if read(c) is not None]
            fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                            name=algorithm.upper(), legendgroup=algorithm, showlegend=col == 1,
                            line={"color": _colour(algorithm)}, row=1, col=col)
    for col in range(1, len(LIFELONG_PANELS) + 1):
        fig.update_xaxes(title_text="facts edited", row=1, col=col)
    fig = _layout(fig, "What the edits do to the model, checkpoint by checkpoint", height=360)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.25, "xanchor": "left", "x": 0})
    return fig
