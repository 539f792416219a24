"""Edit latency on the default model: one ROME edit, one EMMET batch of 100 CounterFact
edits (median over several runs, split by phase), and covariance throughput.

    python bench/edit_latency.py [--runs 5] [--batch 100] [--device cpu] [--set KEY=VALUE]

Covariance statistics and context templates are computed once before timing (the
cached state a user is in after the first edit); value targets are always optimised
(no value cache). Writes bench/results/edit_latency-DEVICE-bBATCH[-KEY=VALUE...].json with the
configuration, hyper-parameters, source revision and library versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from emmet_core import Editor, load_model, score_targets
from emmet_core.cli import add_set_argument, parse_sets
from emmet_core.provenance import versions
from emmet_core.stats import compute_covariances

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": "English", "target_true": "French"}


def timed_runs(editor: Editor, requests: list[dict], algorithm: str, runs: int, overrides: dict) -> dict:
    """Median wall time and per-phase medians over ``runs`` edits (undone after each)."""
    walls, phases = [], []
    for _ in range(runs):
        start = time.perf_counter()
        result = editor.apply(requests, algorithm, **overrides)
        walls.append(time.perf_counter() - start)
        phases.append(result.seconds)
        editor.undo()
    names = sorted({name for p in phases for name in p})
    return {"runs": runs, "median_seconds": statistics.median(walls), "all_seconds": walls,
            "median_phase_seconds": {n: statistics.median(p.get(n, 0.0) for p in phases) for n in names}}


def counterfact_batch(loaded, n: int) -> list[dict]:
    """The first n records whose new object the model does not already give."""
    records = json.loads(DATA.read_text())[: 2 * n]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "target_true": r["ground_truth"]} for r in records]
    greedy = score_targets(loaded, [r["prompt"] for r in requests], [r["target_new"] for r in requests])
    return [r for r, g in zip(requests, greedy) if not g.greedy][:n]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cov-tokens", type=int, default=20_000)
    add_set_argument(parser)  # applies to both edits, e.g. --set value_precision=float32
    args = parser.parse_args()
    overrides = parse_sets(args.hparam)

    loaded = load_model(args.model, device=args.device)
    editor = Editor(loaded)
    batch = counterfact_batch(loaded, args.batch)
    for algorithm, requests in (("rome", [DARRIEUX]), ("emmet", batch[:2])):  # warm caches
        editor.apply(requests, algorithm, **overrides)
        editor.reset()

    rome = timed_runs(editor, [DARRIEUX], "rome", args.runs, overrides)
    print(f"ROME, 1 edit: median {rome['median_seconds']:.2f}s {rome['median_phase_seconds']}", flush=True)
    emmet = timed_runs(editor, batch, "emmet", args.runs, overrides)
    print(f"EMMET, {len(batch)} edits: median {emmet['median_seconds']:.2f}s", flush=True)

    layer = editor.hparams("rome", **overrides).layers[0]
    start = time.perf_counter()
    _, seen = compute_covariances(loaded, [layer], n_tokens=args.cov_tokens, progress=False)
    cov_seconds = time.perf_counter() - start
    print(f"covariance to layer {layer}: {seen / cov_seconds:.0f} tokens/s", flush=True)

    out = {
        "model": args.model, "fingerprint": loaded.fingerprint, "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(), "versions": versions(), "overrides": overrides,
        "rome_single_edit": {**rome, "hparams": editor.hparams("rome", **overrides).to_dict()},
        "emmet_batch": {**emmet, "batch_size": len(batch), "hparams": editor.hparams("emmet", **overrides).to_dict()},
        "covariance": {"layer": layer, "tokens": seen, "seconds": cov_seconds, "tokens_per_second": seen / cov_seconds},
    }
    tag = "".join(f"-{item}" for item in args.hparam)
    path = ROOT / "bench" / "results" / f"edit_latency-{loaded.device.type}-b{len(batch)}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
