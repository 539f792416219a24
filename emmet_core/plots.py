"""Figures of evaluation results (Plotly): metrics against batch size, EMMET vs MEMIT,
in the style of the EMMET paper's Figure 3."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import EditError
from .metrics import mean_delta_norm

log = logging.getLogger(__name__)

PANELS = ("ES", "PS", "NS", "GE", "S")


def load_summaries(directories: list[Path]) -> list[dict]:
    summaries = []
    for directory in directories:
        path = directory / "summary.json" if directory.is_dir() else directory
        if directory.is_dir() and not path.is_file() and (directory / "progress.json").is_file():
            path = directory / "progress.json"  # a run still going (or interrupted): its records so far
        if not path.is_file():
            raise EditError(f"no summary.json in {directory}")
        summary = json.loads(path.read_text())
        records = path.parent / "records.jsonl"
        if "mean_delta_norm" not in summary and records.is_file():  # summaries written before it was added
            summary["mean_delta_norm"] = mean_delta_norm(
                [json.loads(line) for line in records.read_text().splitlines() if line.strip()])
        summaries.append(summary)
    return summaries


def results_table(directories: list[Path]) -> str:
    """A Markdown table of the runs' summaries (×100 scores, GE in bits, wall time):
    the unedited model once, then one row per run."""
    summaries = sorted(load_summaries(directories), key=lambda s: (s["algorithm"], s["batch_size"]))
    head = "| run | n | ES | PS | NS | S | GE | ‖Δ‖ | wall time |\n|---|---|---|---|---|---|---|---|---|\n"

    def cells(scores: dict) -> str:
        return " | ".join(f"{scores[k]:.1f}" if k in scores else "–" for k in ("ES", "PS", "NS", "S")) + \
            (f" | {scores['GE']:.2f}" if "GE" in scores else " | –")

    rows = []
    if summaries:  # the unedited model as measured by the run that covered the most records
        widest = max(summaries, key=lambda s: s["n"])
        rows.append(f"| unedited | {widest['n']} | {cells(widest['pre'])} | – | – |")
    for s in summaries:
        label = f"{s['algorithm'].upper()} batch {s['batch_size']}" + (" sequential" if s.get("sequential") else "")
        norm = s.get("mean_delta_norm")
        done = "" if s.get("complete", True) else f" (of {s['n_planned']})"
        rows.append(f"| {label} | {s['n']}{done} | {cells(s['post'])} | "
                    f"{'–' if norm is None else f'{norm:.1f}'} | {_duration(s['seconds'])} |")
    return head + "\n".join(rows) + "\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def plot_batch_sizes(directories: list[Path], out: Path) -> list[Path]:
    """One panel per metric, one line per algorithm, batch size on a log axis; the
    unedited model's value as a dotted line. Writes HTML, and PNG if kaleido works."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise EditError("plotting needs Plotly: pip install 'emmet-studio[app]'") from None

    summaries = sorted(load_summaries(directories), key=lambda s: (s["algorithm"], s["batch_size"]))
    partial = [s for s in summaries if not s.get("complete", True)]
    for s in partial:  # a point from a fraction of the records would mislead: the table shows it
        log.warning("not plotted: %s batch %d has %d of %d records", s["algorithm"], s["batch_size"], s["n"],
                    s["n_planned"])
    summaries = [s for s in summaries if s not in partial]
    fig = make_subplots(rows=1, cols=len(PANELS), subplot_titles=PANELS)
    colours = {"emmet": "#d62728", "memit": "#1f77b4", "rome": "#2ca02c"}
    for algorithm in sorted({s["algorithm"] for s in summaries}):
        runs = [s for s in summaries if s["algorithm"] == algorithm]
        for col, metric in enumerate(PANELS, start=1):
            fig.add_trace(go.Scatter(
                x=[s["batch_size"] for s in runs], y=[s["post"].get(metric) for s in runs],
                mode="lines+markers", name=algorithm.upper(), legendgroup=algorithm, showlegend=col == 1,
                line={"color": colours.get(algorithm)}), row=1, col=col)
    for col, metric in enumerate(PANELS, start=1):
        widest = max(summaries, key=lambda s: s["n"]) if summaries else {"pre": {}}
        if metric in widest["pre"]:
            fig.add_hline(y=widest["pre"][metric], line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(type="log", title_text="batch size", row=1, col=col)
    model = summaries[0]["model"] if summaries else ""
    fig.update_layout(title=f"Editing {model}: metrics against batch size (dotted: unedited)",
                      height=380, width=1400, template="plotly_white")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "batch_sizes.html"]
    fig.write_html(written[0], include_plotlyjs=True)
    try:
        fig.write_image(out / "batch_sizes.png", scale=1)
        written.append(out / "batch_sizes.png")
    except Exception as exc:  # kaleido missing or without a browser: HTML only
        log.warning("PNG export unavailable (%s); wrote HTML only", exc)
    return written
