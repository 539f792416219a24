"""How full the value passes stay when facts stop early, and what the value phase costs.

    python bench/value_passes.py [--algo emmet] [--n 33] [--device cpu] [--set KEY=VALUE]

Edits the first N records of counterfact-train.json as one batch with the model's preset
(statistics and templates computed first, not timed) and follows the value optimisation
step by step through the edit's progress details ("values: step k/n, m fact(s) still
optimising"). From that trace it counts the fact-steps the passes computed (a pass drops
the rows of its stopped facts once they are half of it or more) against the fact-steps
of passes that kept every row to the end. Writes
bench/results/value_passes-DEVICE-ALGO-nN[-KEY=VALUE...].json with the trace, the phase
times, hyper-parameters, source revision, versions and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

from emmet_core import Editor, load_model
from emmet_core.cli import add_set_argument, parse_sets
from emmet_core.data import load_dataset
from emmet_core.provenance import versions
from emmet_core.values import drops_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
STEP = re.compile(r"^values: step (\d+)/(\d+), (\d+) fact")


def passes_of(trace: list[tuple[int, int]]) -> list[list[int]]:
    """The still-optimising counts per step, one list per pass (a pass starts at step 0)."""
    passes: list[list[int]] = []
    for step, optimising in trace:
        if step == 0:
            passes.append([])
        passes[-1].append(optimising)
    return passes


def fact_steps(counts: list[int], size: int) -> tuple[int, int]:
    """Fact-steps one pass of ``size`` facts computed with row dropping, and without."""
    rows, dropped = size, 0  # rows: the facts still in the pass
    for optimising in counts:
        dropped += rows
        if drops_rows(optimising, rows):
            rows = optimising
    return dropped, size * len(counts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--algo", default="emmet")
    parser.add_argument("--n", type=int, default=33)
    parser.add_argument("--device", default="cpu")
    add_set_argument(parser)
    args = parser.parse_args()
    overrides = parse_sets(args.hparam)

    loaded = load_model(args.model, device=args.device)
    editor = Editor(loaded)
    requests = [r.request for r in load_dataset(str(DATA)).records[: args.n]]
    editor.compute(requests[:1], args.algo, refuse_current=False, **overrides)  # C0 and templates, untimed

    trace: list[tuple[int, int]] = []

    def heard(text: str) -> None:
        match = STEP.match(text)
        if match:
            trace.append((int(match[1]), int(match[3])))

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = editor.compute(requests, args.algo, refuse_current=False, on_phase=heard, **overrides)
    seconds = time.perf_counter() - start
    passes = passes_of(trace)
    counts = [fact_steps(p, p[0]) for p in passes]  # every fact optimises at step 0 (δ = 0)
    computed, full = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"{args.algo}, {len(requests)} facts: values {result.seconds.get('values', 0):.1f} s of {seconds:.1f} s; "
          f"{len(passes)} passes; fact-steps {computed} with row dropping, {full} without "
          f"({1 - computed / full:.0%} fewer)")

    out = {
        "model": args.model, "fingerprint": loaded.fingerprint, "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(), "load_average_1min": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(), "algorithm": args.algo, "facts": len(requests), "seconds": seconds,
        "phase_seconds": result.seconds, "passes": passes, "fact_steps_with_dropping": computed,
        "fact_steps_without_dropping": full, "hparams": result.hparams.to_dict(), "versions": versions(),
    }
    tag = "".join(f"-{item}" for item in args.hparam)
    path = ROOT / "bench" / "results" / f"value_passes-{loaded.device.type}-{args.algo}-n{len(requests)}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
