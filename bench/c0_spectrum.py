"""The spectrum of C0 at the edited layers: how much of the key space AlphaEdit's
projector leaves free (eigenvalues below its threshold) and how well conditioned the
preservation term is. Explains results/lifelong.md; cheap (one eigendecomposition per
layer of the cached C0).

    python bench/c0_spectrum.py [--model smollm2-135m] [--algo alphaedit]

Writes bench/results/c0_spectrum-MODEL-ALGO.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from emmet_core import Editor, load_model
from emmet_core.provenance import versions

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--algo", default="alphaedit")
    args = parser.parse_args()

    loaded = load_model(args.model)
    editor = Editor(loaded)
    hp = editor.hparams(args.algo)
    threshold = hp.nullspace_threshold
    layers = {}
    for layer in hp.layers:
        eigenvalues = torch.linalg.eigvalsh(editor.covariance(layer, hp).double())
        free = int((eigenvalues < threshold).sum())
        layers[str(layer)] = {
            "size": len(eigenvalues), "min": float(eigenvalues[0]), "max": float(eigenvalues[-1]),
            "median": float(eigenvalues.median()), "condition": float(eigenvalues[-1] / eigenvalues[0]),
            "below_threshold": free, "below_threshold_share": free / len(eigenvalues),
        }
        print(f"layer {layer}: eigenvalues {eigenvalues[0]:.2e} … {eigenvalues[-1]:.2e} (condition "
              f"{eigenvalues[-1] / eigenvalues[0]:.1e}); {free} of {len(eigenvalues)} below {threshold:g}")
    out = {"model": args.model, "fingerprint": loaded.fingerprint, "algorithm": args.algo,
           "nullspace_threshold": threshold, "stats": list(hp.stats_settings), "layers": layers,
           "versions": versions()}
    path = ROOT / "bench" / "results" / f"c0_spectrum-{args.model}-{args.algo}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
