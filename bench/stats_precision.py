"""What a faster C0 forward costs: C0 with its forward in bfloat16 (or TF32 on CUDA) against
the float32 one, and the edit scores each gives.

    python bench/stats_precision.py [--precision bfloat16] [--n 64] [--device cpu]

For each layer the presets edit it reports ‖C_fast − C_32‖/‖C_32‖ and the same for
C⁻¹ (what the solvers use); then `emmet eval` runs EMMET and MEMIT on the first N
records of counterfact-edit.json at batch N once per precision. v* does not depend on C0,
so both runs share the value cache and differ only in the solve. Writes
bench/results/stats_precision-<model>-<precision>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from emmet_core import Editor, load_model
from emmet_core.data import load_dataset
from emmet_core.provenance import versions
from emmet_core.runner import EvalConfig, run_eval
from emmet_core.stats import layer_covariances

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="bfloat16", choices=["tf32", "bfloat16"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device)
    editor = Editor(loaded)
    report: dict = {"model": args.model, "device": loaded.placement(), "precision": args.precision, "n": args.n,
                    "versions": versions(), "c0": {}, "eval": {}}
    layers = sorted({layer for algorithm in ("rome", "memit", "emmet") for layer in editor.hparams(algorithm).layers})
    hp = editor.hparams("emmet")
    exact = layer_covariances(loaded, layers, hp.stats_corpus, hp.stats_tokens)
    fast = layer_covariances(loaded, layers, hp.stats_corpus, hp.stats_tokens, precision=args.precision)
    for layer in layers:
        a, b = exact[layer], fast[layer]
        inverse_a, inverse_b = (torch.cholesky_inverse(torch.linalg.cholesky(c)) for c in (a, b))
        report["c0"][layer] = {"rel_diff": float((b - a).norm() / a.norm()),
                               "rel_diff_inverse": float((inverse_b - inverse_a).norm() / inverse_a.norm())}
    dataset = load_dataset(str(DATA))
    dataset.records = dataset.records[: args.n]
    for algorithm in ("emmet", "memit"):
        for precision in ("float32", args.precision):
            config = EvalConfig(algorithm, batch_size=args.n, generation_every=4, gen_tokens=100,
                                overrides={"stats_precision": precision})
            with tempfile.TemporaryDirectory() as out:
                summary = run_eval(Editor(loaded), dataset, config, Path(out), args.model)
            report["eval"][f"{algorithm}-{precision}"] = {"post": summary["post"], "pre": summary["pre"],
                                                          "mean_delta_norm": summary["mean_delta_norm"]}
            print(algorithm, precision, {k: round(v, 2) for k, v in summary["post"].items()}, flush=True)
    path = ROOT / "bench" / "results" / f"stats_precision-{args.model}-{args.precision}-{loaded.device.type}.json"
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report["c0"], indent=1))
    print(path)


if __name__ == "__main__":
    main()
