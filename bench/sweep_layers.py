"""Sweep that chose the shipped presets for models without reference values.

For each candidate (a layer, or a value of one hyper-parameter with the layers fixed),
the algorithm edits each of the first N CounterFact *train* records on its own (weights
restored between records) and scores the rewrite prompt (ES), its paraphrase (PS) and
the neighbourhood prompt (NS) as REFERENCE §7 defines them: is the new object more
likely than the true one (mean per-token NLL)? S is their harmonic mean.

    python bench/sweep_layers.py --model smollm2-135m --algo rome --layers 1,3,5,7 --n 12
    python bench/sweep_layers.py --model smollm2-135m --algo memit --window 4-8 \
        --param mom2_update_weight --values 500,1500,5000,15000 --n 12

Writes bench/results/sweep-<model>-<algo>[-<param>].json, or the file named by --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from emmet_core import Editor, load_model, score_targets
from emmet_core.cli import parse_layers
from emmet_core.provenance import versions

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"


def harmonic(*xs: float) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def scores(loaded, record: dict) -> tuple[bool, bool, bool]:
    prompts = [record["prompt"], record["rephrase_prompt"], record["locality_prompt"]]
    new = score_targets(loaded, prompts, [record["target_new"]] * 3)
    true = score_targets(loaded, prompts, [record["ground_truth"], record["ground_truth"],
                                           record["locality_ground_truth"]])
    es, ps, neighbour_moved = (n.mean_nll < t.mean_nll for n, t in zip(new, true))
    return es, ps, not neighbour_moved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--algo", default="rome")
    parser.add_argument("--layers", default="0-14", help="one candidate per layer")
    parser.add_argument("--window", help="fixed layers (e.g. 4-8) when sweeping --param")
    parser.add_argument("--param", help="hyper-parameter to sweep with --window")
    parser.add_argument("--values", help="comma-separated values of --param, or a YAML list")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", help="result file (default bench/results/sweep-MODEL-ALGO[-PARAM].json)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    editor = Editor(loaded)
    records = json.loads(Path(args.data).read_text())[: args.n]
    pre = [scores(loaded, r) for r in records]
    rows = []
    if args.param:
        window = parse_layers(args.window) or editor.hparams(args.algo).layers
        # numbers or words ("most_probable"), or a YAML list for values with commas: '[[[5, 10]], [[10, 10]]]'
        values = yaml.safe_load(args.values) if args.values.startswith("[") else \
            [yaml.safe_load(v) for v in args.values.split(",")]
        candidates = [(args.param, v, editor.hparams(args.algo, layers=window, **{args.param: v})) for v in values]
    else:
        candidates = [("layer", layer, editor.hparams(args.algo, layers=(layer,)))
                      for layer in parse_layers(args.layers)]
    for name, value, hp in candidates:
        post, times, norms = [], [], []
        for record in records:
            request = {"prompt": record["prompt"], "subject": record["subject"],
                       "target_new": record["target_new"], "target_true": record["ground_truth"]}
            start = time.perf_counter()
            result = editor.apply([request], hparams=hp, refuse_current=False)  # every record, as in an evaluation
            times.append(time.perf_counter() - start)
            norms.append(sum(result.norms.values()))
            post.append(scores(loaded, record))
            editor.undo()
        es, ps, ns = (100 * statistics.mean(x[i] for x in post) for i in range(3))
        row = {name: value, "layers": list(hp.layers), "ES": es, "PS": ps, "NS": ns, "S": harmonic(es, ps, ns),
               "median_seconds": statistics.median(times), "mean_delta_norm": statistics.mean(norms)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    es, ps, ns = (100 * statistics.mean(x[i] for x in pre) for i in range(3))
    out = {"model": args.model, "fingerprint": loaded.fingerprint, "algorithm": args.algo, "n": args.n,
           "data": Path(args.data).name, "pre": {"ES": es, "PS": ps, "NS": ns, "S": harmonic(es, ps, ns)},
           "rows": rows, "best": max(rows, key=lambda r: r["S"]),
           "hparams": editor.hparams(args.algo).to_dict(), "versions": versions()}
    suffix = f"-{args.param}" if args.param else ""
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"sweep-{args.model}-{args.algo}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"best {out['best']}; wrote {path}")


if __name__ == "__main__":
    main()
