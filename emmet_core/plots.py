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


def curves_table(directories: list[Path]) -> str:
    """Lifelong runs at their first and last checkpoint: retention, held-out facts, GE,
    perplexity and the total drift of the edited matrices (an unedited row once per
    distinct measurement)."""
    head = ("| run | edits | retention ES | PS | NS | S | held-out kept | GE | perplexity | ‖W − W₀‖ | wall time |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")

    def number(value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    rows = []
    for summary, lines in load_curves(directories):
        for line in (lines[0], lines[-1]) if len(lines) > 1 else lines:
            kept = line["retention"]
            drift = sum(v * v for v in line["delta_norms"].values()) ** 0.5
            name = "unedited" if line["edits"] == 0 else f"{summary['algorithm'].upper()} b{summary['batch_size']}"
            scores = " | ".join(number(kept.get(k)) for k in ("ES", "PS", "NS", "S"))
            row = (f"| {name} | {line['edits']} | {scores} | {number(line.get('heldout_kept'))} | "
                   f"{number(line.get('GE'), 2)} | {number(line.get('perplexity'), 2)} | {number(drift)} | "
                   f"{_duration(line.get('seconds', 0))} |")
            if row not in rows:  # runs on the same model and held-out set share their unedited row
                rows.append(row)
    return head + "\n".join(rows) + "\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise EditError("plotting needs Plotly: pip install 'emmet-studio[app]'") from None
    return go, make_subplots


def _save(fig, out: Path, name: str) -> list[Path]:
    """HTML always, PNG if kaleido can draw it."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.html"]
    fig.write_html(written[0], include_plotlyjs=True)
    try:
        fig.write_image(out / f"{name}.png", scale=1)
        written.append(out / f"{name}.png")
    except Exception as exc:  # kaleido missing or without a browser: HTML only
        log.warning("PNG export unavailable (%s); wrote HTML only", exc)
    return written


# The panels of a lifelong run: (title, how to read the value off one curves.jsonl line).
CURVE_PANELS = (
    ("retention S", lambda c: c["retention"].get("S")),
    ("retention ES", lambda c: c["retention"].get("ES")),
    ("held-out facts kept", lambda c: c.get("heldout_kept")),
    ("GE (bits)", lambda c: c.get("GE")),
    ("perplexity (log scale)", lambda c: c.get("perplexity")),  # a collapse runs into the thousands
    ("‖W − W₀‖ (all layers)", lambda c: sum(v * v for v in c["delta_norms"].values()) ** 0.5),
)


def load_curves(directories: list[Path]) -> list[tuple[dict, list[dict]]]:
    """(summary or progress, checkpoints) of every directory that holds a curves.jsonl."""
    runs = []
    for directory in directories:
        path = directory / "curves.jsonl"
        if not path.is_file():
            continue
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        runs.append((load_summaries([directory])[0], lines))
    return runs


def plot_curves(directories: list[Path], out: Path) -> list[Path]:
    """Lifelong runs on one figure: one panel per measure, one line per run, edits on x."""
    go, make_subplots = _plotly()
    runs = load_curves(directories)
    if not runs:
        raise EditError("no curves.jsonl in the given directories (run emmet eval --sequential --checkpoint-every K)")
    fig = make_subplots(rows=2, cols=3, subplot_titles=[title for title, _ in CURVE_PANELS])
    colours = {"emmet": "#d62728", "memit": "#1f77b4", "rome": "#2ca02c", "alphaedit": "#9467bd", "encore": "#ff7f0e"}
    for summary, lines in runs:
        label = f"{summary['algorithm']} b{summary['batch_size']}"
        for index, (_, read) in enumerate(CURVE_PANELS):
            points = [(c["edits"], read(c)) for c in lines if read(c) is not None]
            fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                     name=label, legendgroup=label, showlegend=index == 0,
                                     line={"color": colours.get(summary["algorithm"])}),
                          row=index // 3 + 1, col=index % 3 + 1)
    for index, (title, _) in enumerate(CURVE_PANELS):
        fig.update_xaxes(title_text="edits so far", row=index // 3 + 1, col=index % 3 + 1)
        if "log scale" in title:
            fig.update_yaxes(type="log", row=index // 3 + 1, col=index % 3 + 1)
    fig.update_layout(title=f"Lifelong editing of {runs[0][0]['model']}", height=700, width=1400,
                      template="plotly_white")
    return _save(fig, out, "curves")


def plot_batch_sizes(directories: list[Path], out: Path) -> list[Path]:
    """One panel per metric, one line per algorithm, batch size on a log axis; the
    unedited model's value as a dotted line. Writes HTML, and PNG if kaleido works."""
    go, make_subplots = _plotly()
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
    return _save(fig, out, "batch_sizes")
