"""Why batched edits degrade: conditioning of the systems EMMET and MEMIT solve, and the
size of their updates, against batch size (REFERENCE §8; the EMMET paper's Figure 3).

For the first N records of a CounterFact file (the first chunk of an ``emmet eval`` run
at batch size N) this computes the keys at the edited layer and reports
  - EMMET: eigenvalues of Kᵀ C0⁻¹ K (N×N), whose inverse EMMET applies; its condition
    number with and without the ridge ρ;
  - MEMIT: the condition number of λ C0 + K Kᵀ at its first layer;
and, if result directories are given, the mean ‖Δ‖ per chunk read from their
``records.jsonl``. Writes ``bench/results/collapse-<model>.json``.

    python bench/collapse.py --data ../shared/data/counterfact/counterfact-edit.json \
        --runs results/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean

import torch

from emmet_core import Editor, load_model
from emmet_core.data import load_dataset
from emmet_core.keys import compute_keys
from emmet_core.provenance import versions
from emmet_core.templates import context_templates


def spectrum_summary(matrix: torch.Tensor) -> dict[str, float]:
    eig = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return {"min_eig": float(eig.min()), "max_eig": float(eig.max()),
            "condition": float(eig.max() / eig.min().clamp_min(1e-300))}


def mean_delta_norms(run: Path) -> dict[str, float] | None:
    """Mean over chunks of ‖Δ‖ per layer, from a run's records.jsonl."""
    path = run / "records.jsonl"
    if not path.is_file():
        return None
    per_chunk: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        per_chunk[row["chunk"]] = row["delta_norms"]
    layers = sorted({k for norms in per_chunk.values() for k in norms}, key=int)
    return {layer: fmean(n[layer] for n in per_chunk.values() if layer in n) for layer in layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", default="1,16,64,256,1000")
    parser.add_argument("--runs", type=Path, help="directory holding <algo>-b<N>/ result folders")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    loaded = load_model(args.model)
    editor = Editor(loaded)
    records = load_dataset(args.data).records
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    for algorithm in ("emmet", "memit"):
        hp = editor.hparams(algorithm)
        layer = hp.layers[0]
        cov = editor.covariance(layer, hp).to(torch.float64)
        templates = context_templates(loaded, [list(x) for x in hp.context_templates], seed=hp.seed)
        keys, _ = compute_keys(loaded, [r.request for r in records[: max(sizes)]], templates, layer, mode="half")
        keys = keys.to(torch.float64)
        for n in sizes:
            k = keys[:, :n]
            row = {"algorithm": algorithm, "batch_size": n, "layer": layer}
            if algorithm == "emmet":
                gram = k.T @ torch.linalg.solve(cov, k)
                row["gram"] = spectrum_summary(gram)
                row["gram_with_ridge"] = spectrum_summary(gram + hp.ridge * torch.eye(n, dtype=gram.dtype))
                row["ridge"] = hp.ridge
            else:
                row["system"] = spectrum_summary(hp.mom2_update_weight * cov + k @ k.T)
                row["mom2_update_weight"] = hp.mom2_update_weight
            if args.runs:
                row["mean_delta_norm"] = mean_delta_norms(args.runs / f"{algorithm}-b{n}")
            rows.append(row)
            print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"collapse-{args.model}.json"
    path.write_text(json.dumps({"model": args.model, "fingerprint": loaded.fingerprint, "data": args.data,
                                "rows": rows, "versions": versions()}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
