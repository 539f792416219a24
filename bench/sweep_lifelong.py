"""Sweep that chose the lifelong editors' settings (AlphaEdit's null-space threshold,
ENCORE's norm weight μ) for models without reference values.

Each candidate runs the lifelong protocol on the first N CounterFact *train* records
(never the edit split used for reported results) in sequential batches, with the next
records of the train split held out, and is judged at its last checkpoint: retention S,
held-out facts kept, GE, perplexity and ‖W − W₀‖.

    python bench/sweep_lifelong.py --algo alphaedit --param nullspace_threshold --values 0.005,0.01,0.02
    python bench/sweep_lifelong.py --algo encore --param encore_norm_weight --values 1,10,100

Writes bench/results/sweep-lifelong-<model>-<algo>-<param>.json (the runs themselves in a
folder of the same name).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from emmet_core import Editor, load_model
from emmet_core.data import load_dataset
from emmet_core.provenance import versions
from emmet_core.runner import EvalConfig, run_eval

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--algo", required=True)
    parser.add_argument("--param", required=True)
    parser.add_argument("--values", required=True, help="comma-separated, read as YAML scalars")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=50)
    args = parser.parse_args()

    dataset = load_dataset(str(DATA))
    records, heldout = dataset.records[: args.n], dataset.records[args.n : args.n + args.heldout]
    name = f"sweep-lifelong-{args.model}-{args.algo}-{args.param}"
    folder = ROOT / "bench" / "results" / name
    results = []
    for text in args.values.split(","):
        value = yaml.safe_load(text)
        loaded = load_model(args.model, device="cpu")
        out = folder / f"{args.param}={value}"
        shutil.rmtree(out, ignore_errors=True)
        config = EvalConfig(args.algo, batch_size=args.batch_size, sequential=True, generation_every=10,
                            gen_tokens=50, overrides={args.param: value}, checkpoint_every=args.batch_size,
                            retention=100, heldout=len(heldout), documents=20)
        dataset.records = records
        summary = run_eval(Editor(loaded), dataset, config, out, args.model, progress=False, heldout=heldout)
        curves = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
        first, last = curves[0], curves[-1]
        row = {args.param: value, "edits": last["edits"], "retention": last["retention"],
               "heldout_kept": [first["heldout_kept"], last["heldout_kept"]], "GE": [first["GE"], last["GE"]],
               "perplexity": [first["perplexity"], last["perplexity"]],
               "delta_norm": sum(v * v for v in last["delta_norms"].values()) ** 0.5,
               "newest": last["newest"], "seconds": summary["seconds"]}
        results.append(row)
        print(yaml.safe_dump(row, sort_keys=False, width=200), flush=True)
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.write_text(json.dumps({"model": args.model, "algorithm": args.algo, "param": args.param,
                                "n": args.n, "batch_size": args.batch_size, "heldout": len(heldout),
                                "data": DATA.name, "results": results, "versions": versions()}, indent=1))
    print(path)


if __name__ == "__main__":
    main()
