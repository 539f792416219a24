"""Layer sweep that chose the shipped presets for models without reference values.

For each candidate layer, ROME edits each of the first N CounterFact *train* records
(one at a time, weights restored between records) and scores the rewrite prompt (ES),
its paraphrase (PS) and the neighbourhood prompt (NS) as REFERENCE §7 defines them:
new-vs-true comparisons of the whole target string's probability. S is their harmonic
mean. Writes bench/results/sweep-<model>.json.

    python bench/sweep_layers.py --model smollm2-135m --layers 0-14 --n 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from emmet_core import Editor, load_model, score_targets
from emmet_core.cli import parse_layers, versions

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"


def harmonic(*xs: float) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def scores(loaded, record: dict) -> tuple[bool, bool, bool]:
    prompts = [record["prompt"], record["rephrase_prompt"], record["locality_prompt"]]
    new = score_targets(loaded, prompts, [record["target_new"]] * 3)
    true = score_targets(loaded, prompts, [record["ground_truth"], record["ground_truth"],
                                           record["locality_ground_truth"]])
    es, ps, ns = (n.mean_nll < t.mean_nll for n, t in zip(new[:2] + new[2:], true))
    return es, ps, not ns


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--algo", default="rome")
    parser.add_argument("--layers", default="0-14")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    loaded = load_model(args.model)
    editor = Editor(loaded)
    records = json.loads(Path(args.data).read_text())[: args.n]
    pre = [scores(loaded, r) for r in records]
    rows = []
    for layer in parse_layers(args.layers):
        hp = editor.hparams(args.algo, layers=(layer,))
        post, times, norms = [], [], []
        for record in records:
            request = {"prompt": record["prompt"], "subject": record["subject"],
                       "target_new": record["target_new"], "target_true": record["ground_truth"]}
            start = time.perf_counter()
            result = editor.apply([request], hparams=hp)
            times.append(time.perf_counter() - start)
            norms.append(sum(result.norms.values()))
            post.append(scores(loaded, record))
            editor.undo()
        es, ps, ns = (100 * statistics.mean(x[i] for x in post) for i in range(3))
        row = {"layer": layer, "ES": es, "PS": ps, "NS": ns, "S": harmonic(es, ps, ns),
               "median_seconds": statistics.median(times), "mean_delta_norm": statistics.mean(norms)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    es, ps, ns = (100 * statistics.mean(x[i] for x in pre) for i in range(3))
    out = {"model": args.model, "fingerprint": loaded.fingerprint, "algorithm": args.algo, "n": args.n,
           "data": Path(args.data).name, "pre": {"ES": es, "PS": ps, "NS": ns, "S": harmonic(es, ps, ns)},
           "rows": rows, "best_layer": max(rows, key=lambda r: r["S"])["layer"],
           "hparams": editor.hparams(args.algo).to_dict(), "versions": versions()}
    path = ROOT / "bench" / "results" / f"sweep-{args.model}-{args.algo}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"best layer {out['best_layer']}; wrote {path}")


if __name__ == "__main__":
    main()
