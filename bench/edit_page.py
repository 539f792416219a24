"""What a user of the Edit page waits for: one ROME edit of the default model through the
page's own path (:func:`edit_fact` then :func:`generate_texts`), split into reading the
model before, the edit, reading after (the probability charts appear here) and writing
the texts; plus sampling 2 × 40 tokens with one and with two CPU threads.

    python bench/edit_page.py [--runs 3] [--gen-tokens 40] [--threads]

Statistics and templates are computed before timing (the state after a user's first
edit). Writes bench/results/edit_page-DEVICE-tTHREADS[-POLICY].json (POLICY:
$OMP_WAIT_POLICY) with the load average, since a busy machine changes these figures more
than anything in the code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from emmet_core import load_model
from emmet_core.provenance import versions
from emmet_core.request import EditRequest
from emmet_core.studio.workflows import FactChecks, edit_fact, generate_texts
from emmet_core.studio.workspace import Session, SharedModel

ROOT = Path(__file__).resolve().parent.parent


def example() -> tuple[EditRequest, list[str], list[tuple[str, str | None]]]:
    """The app's first ready-made example, with its paraphrases and neighbours."""
    first = json.loads((ROOT / "assets" / "examples.json").read_text(encoding="utf-8"))[0]
    request = EditRequest(first["prompt"], first["subject"], first["target_new"])
    return request, list(first["paraphrases"]), [tuple(n) for n in first["neighbours"]]


def edit_once(shared: SharedModel, gen_tokens: int) -> dict[str, float]:
    """One edit as the page does it, from a fresh session; seconds per part."""
    request, paraphrases, neighbours = example()
    session = Session(shared)
    started = time.perf_counter()
    report = edit_fact(session, request, FactChecks(paraphrases, list(neighbours), gen_tokens=gen_tokens), "rome")
    charts = time.perf_counter() - started
    generate_texts(session, report)
    return {**report.seconds, "to charts": charts, "to texts": time.perf_counter() - started}


def sampling(shared: SharedModel, gen_tokens: int, threads: int) -> float:
    """Seconds to sample the page's two texts with ``threads`` CPU threads, calling
    transformers directly (readout.generate would pin decoding to one thread)."""
    loaded = shared.loaded
    prompts = [example()[0].text, example()[1][0]]
    encoded = loaded.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(loaded.device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with shared.locked(), torch.no_grad():
            start = time.perf_counter()
            loaded.model.generate(**encoded, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=True,
                                  top_k=5, pad_token_id=loaded.tokenizer.pad_token_id)
            return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=40)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", action="store_true", help="also time sampling with 1 and 2 CPU threads")
    args = parser.parse_args()
    shared = SharedModel(load_model(args.model, device="auto"))
    edit_once(shared, 0)  # C0, templates and first-call costs, as after a user's first edit
    runs = [edit_once(shared, args.gen_tokens) for _ in range(args.runs)]
    device = str(shared.loaded.device).split(":")[0]
    out = {
        "model": args.model, "device": device, "runs": args.runs, "gen_tokens": args.gen_tokens,
        "median_seconds": {name: statistics.median(run[name] for run in runs) for name in runs[0]},
        "runs_seconds": runs, "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": versions(),
    }
    policy = f"-{os.environ['OMP_WAIT_POLICY'].lower()}" if os.environ.get("OMP_WAIT_POLICY") else ""
    path = ROOT / "bench" / "results" / f"edit_page-{device}-t{torch.get_num_threads()}{policy}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out["median_seconds"], indent=2), flush=True)
    if args.threads:
        torch.manual_seed(0)
        out["two_texts_sampling_seconds_by_cpu_threads"] = {str(n): sampling(shared, args.gen_tokens, n)
                                                            for n in (1, 2)}
        out["load_average_1min_after_threads"] = os.getloadavg()[0]
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(out["two_texts_sampling_seconds_by_cpu_threads"]), flush=True)


if __name__ == "__main__":
    main()
