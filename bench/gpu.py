"""The GPU benchmark: run it first whenever a GPU is lent (about 8 minutes on an H100/H200).

Randomly initialised models of real shapes (GPT-2 XL, GPT-J-6B, Llama-2-7B), built on the
device straight from their configs with the SmolLM2 tokenizer the project ships, so no
checkpoint is needed; float32 weights and the presets of ``emmet_core/presets``. Random
weights never reach the value optimisation's stop loss, so every v* step runs: the times
are upper bounds for real checkpoints. Stages:

    env, tokenize            the card and the software; how fast the tokenizer alone feeds C0
    <model>:c0               C0 tokens/s to the preset layer, forward in float32 / tf32 / bfloat16,
                             and how far the faster C0s are from the float32 one (sums float64)
    <model>:rome             seconds per ROME edit (median of 5 after a first edit that pays
                             for C0 and templates), values in float32 and in tf32
    gpt2-xl:emmet-1k/-10k    EMMET and MEMIT on 1,000 and 10,000 CounterFact facts, seconds by
    gpt2-xl:memit-1k/-10k    phase and peak memory; 1k with the preset's float32 values, 10k with
                             --precision-10k (bfloat16 by default: at float32 the value steps alone
                             would take ~20 min). A 10k stage is skipped, with the reason, when the
                             1k time says it would not fit the time left
    gpt2-xl:eval             ``emmet eval``'s runner on 8 records, batch 8
    gpt2-xl:workspace        two app sessions editing one shared model: isolation, exact undo

Every stage has a time budget and its own try/except; the results file is rewritten after
every stage, so a cut run keeps what it measured.

Here (once per checkout; writes the ignored folder .bench-gpu: tokenizer, corpus, 10,000 facts
without two that share a key, revision):
    python bench/gpu.py --prepare
On the device machine (it has PyTorch, transformers, accelerate, safetensors, PyYAML, tqdm):
    python3 bench/gpu.py --assets .bench-gpu --out $OUT/gpu.json      # carry: [".bench-gpu"]
Dry run on a CPU with tiny shapes of the same depth (what the test suite runs):
    python bench/gpu.py --tiny --assets .bench-gpu --out /tmp/gpu-tiny.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the device machine runs the checkout without installing it

from emmet_core import Editor  # noqa: E402
from emmet_core.data import load_dataset  # noqa: E402
from emmet_core.editor import EditResult  # noqa: E402
from emmet_core.models import LoadedModel, prepare  # noqa: E402
from emmet_core.passes import peak_allocated, reset_peak  # noqa: E402
from emmet_core.provenance import source_revision, versions  # noqa: E402
from emmet_core.request import EditRequest  # noqa: E402
from emmet_core.runner import EvalConfig, run_eval  # noqa: E402
from emmet_core.stats import compute_covariances, token_sequences  # noqa: E402
from emmet_core.studio.workspace import Session, SharedModel  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
ASSETS = ROOT / ".bench-gpu"

# Real shapes (the published configs' sizes); the vocabulary is the SmolLM2 tokenizer's.
SHAPES = {
    "gpt2-xl": ("GPT2Config", dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024)),
    "llama-2-7b": ("LlamaConfig", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                       num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096)),
    "gpt-j-6b": ("GPTJConfig", dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048)),
}
# --tiny: the same depths (so the presets' layers exist) at toy widths, for a CPU dry run.
TINY = {
    "gpt2-xl": dict(n_embd=32, n_head=2),
    "llama-2-7b": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2),
    "gpt-j-6b": dict(n_embd=32, n_head=2, rotary_dim=8),
}


class Bench:
    """Stages, their budgets and the results file, written after every stage."""

    def __init__(self, out: Path, budget: float, tiny: bool, assets: Path) -> None:
        self.out, self.budget, self.tiny, self.assets = out, budget, tiny, assets
        self.started = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        self.results: dict = {"stages": {}, "tiny": tiny, "budget_seconds": budget}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def stage(self, name: str, work: Callable[[], dict], estimate: float = 0.0) -> dict | None:
        """Run one stage unless its estimated seconds exceed the time left; record
        seconds, peak GPU memory and the outcome, then rewrite the results file."""
        if estimate > self.left():
            entry = {"status": "skipped", "reason": f"needs about {estimate:.0f} s, {self.left():.0f} s left"}
            print(f"[bench] {name}: skipped ({entry['reason']})", flush=True)
            self._record(name, entry)
            return None
        if self.device.type == "cuda":
            reset_peak(self.device)
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            entry = {"status": "ok", **work()}
        except Exception as exc:  # a failed stage is a result too; the next ones still run
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=6)[-2000:]}
        entry["seconds"] = round(time.perf_counter() - start, 3)
        if self.device.type == "cuda":
            entry["peak_gib"] = round(peak_allocated(self.device) / 2**30, 2)  # across the value passes' resets
        print(f"[bench] {name}: {entry['status']} in {entry['seconds']:.1f} s "
              + json.dumps({k: v for k, v in entry.items() if k not in ("traceback", "status", "seconds")})[:400],
              flush=True)
        self._record(name, entry)
        return entry if entry["status"] == "ok" else None

    def _record(self, name: str, entry: dict) -> None:
        self.results["stages"][name] = entry
        self.results["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1), encoding="utf-8")
        tmp.replace(self.out)


# -- assets ----------------------------------------------------------------------------------
def prepare_assets(folder: Path, facts: int = 10_000, corpus_docs: int = 10_033) -> None:
    """What the device machine cannot get itself: the SmolLM2 tokenizer (from the offline
    package, via the model loader), Wikipedia lead sections for C0, CounterFact records,
    and the source revision (the copy sent there has no .git)."""
    from emmet_core.models import load_model
    from emmet_core.stats import corpus_texts

    folder.mkdir(parents=True, exist_ok=True)
    load_model("smollm2-135m", device="cpu").tokenizer.save_pretrained(folder / "tokenizer")
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for _, text in zip(range(corpus_docs), corpus_texts("wiki-offline")):
            handle.write(json.dumps({"text": text}) + "\n")
    # One batch cannot hold two facts that read the same key with different objects (224
    # such pairs among the 10,000 edit records), so the train split tops up what is left out.
    records, keys = [], set()
    for split in ("counterfact-edit.json", "counterfact-train.json"):
        for record in json.loads((DATA.parent / split).read_text(encoding="utf-8")):
            key = EditRequest(record["prompt"], record["subject"], record["target_new"]).key_text
            if key not in keys and len(records) < facts:
                keys.add(key)
                records.append({**record, "case_id": f"{split.split('-')[1].split('.')[0]}-{record['case_id']}"})
    (folder / "counterfact.json").write_text(json.dumps(records), encoding="utf-8")
    (folder / "revision.txt").write_text(source_revision() or "unknown", encoding="utf-8")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"wrote {folder} ({size / 2**20:.1f} MiB): carry it with the run (carry: [\"{folder.name}\"])")


# -- models ----------------------------------------------------------------------------------
def build(name: str, tokenizer: PreTrainedTokenizerBase, device: torch.device, tiny: bool) -> LoadedModel:
    """A randomly initialised model of ``name``'s shape, made directly on ``device``."""
    import transformers

    config_class, sizes = SHAPES[name]
    sizes = {**sizes, **(TINY[name] if tiny else {})}
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                                                 **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return prepare(model, tokenizer, name, device, fingerprint=f"bench-random-{name}-{'tiny' if tiny else 'full'}")


def requests(path: Path, n: int) -> list[EditRequest]:
    records = json.loads(path.read_text(encoding="utf-8"))
    return [EditRequest(r["prompt"], r["subject"], r["target_new"], r["ground_truth"]) for r in records[:n]]


def phases(result: EditResult) -> dict:
    return {k: round(v, 3) for k, v in result.seconds.items()}


# -- stages ----------------------------------------------------------------------------------
def c0_stage(loaded: LoadedModel, layer: int, corpus: str, tiny: bool) -> dict:
    """Tokens/s of C0 to ``layer`` at each forward precision; the faster ones' distance
    from the float32 C0 on the same tokens."""
    warm = 4096 if tiny else 65_536
    compute_covariances(loaded, [layer], corpus, warm, progress=False)  # kernels, allocator, caches
    start = time.perf_counter()
    compute_covariances(loaded, [layer], corpus, warm, progress=False)
    rate = warm / (time.perf_counter() - start)
    n_tokens = int(min(max(rate * (2 if tiny else 12), warm), 8192 if tiny else 1_500_000))
    out: dict = {"layer": layer, "tokens": n_tokens}
    reference = None
    for precision in ("float32", "tf32", "bfloat16"):
        start = time.perf_counter()
        covs, seen = compute_covariances(loaded, [layer], corpus, n_tokens, progress=False, precision=precision)
        seconds = time.perf_counter() - start
        out[precision] = {"tokens_per_s": round(seen / seconds), "seconds": round(seconds, 2)}
        if reference is None:
            reference = covs[layer]
        else:
            out[precision]["rel_diff_from_float32"] = float((covs[layer] - reference).norm() / reference.norm())
    out["tokens_seen"] = seen
    return out


def rome_stage(loaded: LoadedModel, facts: list[EditRequest], overrides: dict, runs: int) -> dict:
    editor = Editor(loaded)
    out: dict = {}
    start = time.perf_counter()
    first = editor.apply([facts[0]], "rome", refuse_current=False, **overrides)
    editor.undo()
    out["first_edit"] = {"seconds": round(time.perf_counter() - start, 2), "phases": phases(first)}
    for precision in ("float32", "tf32"):
        walls, runs_phases = [], []
        for request in facts[1 : runs + 1]:
            start = time.perf_counter()
            result = editor.apply([request], "rome", refuse_current=False,
                                  **{**overrides, "value_precision": precision})
            walls.append(time.perf_counter() - start)
            runs_phases.append(result.seconds)
            editor.undo()
        out[f"values_{precision}"] = {
            "median_seconds": round(statistics.median(walls), 3), "all_seconds": [round(w, 3) for w in walls],
            "median_phases": {k: round(statistics.median(p[k] for p in runs_phases), 3) for k in runs_phases[0]}}
    out["layers"] = list(first.hparams.layers)
    out["v_num_grad_steps"] = first.hparams.v_num_grad_steps
    return out


def batch_stage(loaded: LoadedModel, facts: list[EditRequest], algorithm: str, overrides: dict) -> dict:
    editor = Editor(loaded)
    result = editor.apply(facts, algorithm, refuse_current=False, **overrides)
    out = {"facts": len(facts), "phases": phases(result), "layers": list(result.hparams.layers),
           "value_precision": result.hparams.value_precision, "delta_norms": result.to_dict()["delta_norms"]}
    editor.undo()
    return out


def eval_stage(loaded: LoadedModel, data: Path, overrides: dict, tiny: bool) -> dict:
    dataset = load_dataset(str(data))
    dataset.records = dataset.records[: 2 if tiny else 8]
    config = EvalConfig("emmet", batch_size=len(dataset.records), gen_tokens=8 if tiny else 100, overrides=overrides)
    with tempfile.TemporaryDirectory() as out:
        summary = run_eval(Editor(loaded), dataset, config, Path(out), loaded.name, progress=False)
    return {"records": summary["n"], "run_seconds": round(summary["seconds"], 2), "post": summary["post"],
            "device": summary["device"]}


def workspace_stage(loaded: LoadedModel, facts: list[EditRequest], overrides: dict) -> dict:
    """Two sessions over one model, as the app runs them: each sees only its own edit,
    the shared weights stay original, and undo is exact."""
    shared = SharedModel(loaded)
    first, second = Session(shared), Session(shared)
    adapter = loaded.adapter

    def weights(layers: list[int]) -> dict[int, torch.Tensor]:
        return {layer: adapter.weight(layer).detach().clone() for layer in layers}

    timings = {}
    for session, algorithm, request in ((first, "rome", facts[0]), (second, "emmet", facts[1])):
        start = time.perf_counter()
        session.edit([request], algorithm, refuse_current=False, hparams=session.hparams(algorithm, **overrides))
        timings[algorithm] = round(time.perf_counter() - start, 2)
    layers = sorted({*first.records[0].layers, *second.records[0].layers})
    original = weights(layers)
    seen_first = first.run(lambda _: weights(layers))
    seen_second = second.run(lambda _: weights(layers))
    differ = any(not torch.equal(seen_first[k], seen_second[k]) for k in layers)
    untouched = all(torch.equal(original[k], weights(layers)[k]) for k in layers)
    first.undo()
    undone = all(torch.equal(first.run(lambda _: weights(layers))[k], original[k]) for k in layers)
    return {"seconds_per_session_edit": timings, "sessions_isolated": differ, "shared_weights_original": untouched,
            "undo_exact": undone, "ok": differ and untouched and undone}


def tiny_overrides(tiny: bool) -> dict:
    """The dry run keeps the presets' layers but few steps and templates."""
    return {"v_num_grad_steps": 3, "context_templates": ((3, 2),), "stats_tokens": 2000} if tiny else {}


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="write the assets folder, then stop")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--out", type=Path, help="results file (default bench/results/gpu-<device>.json)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--tiny", action="store_true", help="dry run: toy widths on the CPU")
    parser.add_argument("--stages", help="comma-separated stage names or prefixes to run (default: all)")
    parser.add_argument("--precision-10k", default="bfloat16", choices=["float32", "tf32", "bfloat16"],
                        help="value_precision of the 10k-fact batches (the 1k ones keep the preset's float32)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("emmet_core.passes").setLevel(logging.INFO)  # the pass sizes chosen on a GPU
    if args.prepare:
        prepare_assets(args.assets)
        return
    # A cache of this run's own: nothing measured comes from an earlier run's files.
    with tempfile.TemporaryDirectory(prefix="emmet-bench-gpu-") as cache:
        os.environ["EMMET_CACHE_DIR"] = cache
        run_all(args)


def run_all(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.assets / "tokenizer")
    corpus, data = str(args.assets / "corpus.jsonl"), args.assets / "counterfact.json"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") + ("-tiny" if args.tiny else "")
    bench = Bench(args.out or ROOT / "bench" / "results" / f"gpu-{slug}.json", args.budget, args.tiny, args.assets)
    wanted = [s.strip() for s in (args.stages or "").split(",") if s.strip()]

    def run(name: str, work: Callable[[], dict], estimate: float = 0.0) -> dict | None:
        if wanted and not any(name == w or name.startswith(w) for w in wanted):
            return None
        return bench.stage(name, work, estimate)

    revision = source_revision() or (args.assets / "revision.txt").read_text().strip()
    bench.stage("env", lambda: {  # always: every results file names its card and code
        "device": card, "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        if device.type == "cuda" else None, "cuda": torch.version.cuda, "versions": versions(),
        "revision": revision, "argv": sys.argv[1:]})
    bench.results["device"] = card

    def tokenize() -> dict:
        start = time.perf_counter()
        seen = sum(len(s) for s in token_sequences(tokenizer, corpus, 10**9, 256))
        return {"tokens": seen, "tokens_per_s": round(seen / (time.perf_counter() - start))}
    run("tokenize", tokenize)

    scale = 40 if args.tiny else 1  # the dry run edits 1/40 of the facts
    facts = requests(data, 10_000 // scale)
    for name in SHAPES:
        if wanted and not any(w.startswith(name) or f"{name}:".startswith(w) for w in wanted):
            continue
        built: list[LoadedModel] = []
        bench.stage(f"{name}:build", lambda name=name, built=built: build_stage(name, tokenizer, device, args.tiny,
                                                                                   built))
        if built:
            model_stages(run, bench, built.pop(), facts, corpus, data, args.tiny, bool(wanted), args.precision_10k)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"[bench] wrote {bench.out}")


def build_stage(name: str, tokenizer: PreTrainedTokenizerBase, device: torch.device, tiny: bool,
                into: list[LoadedModel]) -> dict:
    start = time.perf_counter()
    into.append(build(name, tokenizer, device, tiny))
    params = sum(p.numel() for p in into[-1].model.parameters())
    return {"build_seconds": round(time.perf_counter() - start, 2), "parameters": params}


StageRunner = Callable[[str, Callable[[], dict], float], "dict | None"]


def model_stages(run: StageRunner, bench: Bench, loaded: LoadedModel, facts: list[EditRequest], corpus: str,
                 data: Path, tiny: bool, chosen: bool, precision_10k: str) -> None:
    """Every stage of one model: C0 and ROME for all; batches, eval and sessions on GPT-2 XL."""
    name = loaded.name
    scale = 40 if tiny else 1
    overrides = {**tiny_overrides(tiny), "stats_corpus": corpus}
    layer = Editor(loaded).hparams("rome").layers[0]
    run(f"{name}:c0", lambda: c0_stage(loaded, layer, corpus, tiny), 30)
    run(f"{name}:rome", lambda: rome_stage(loaded, facts, overrides, 2 if tiny else 5), 30)
    if name != "gpt2-xl":
        return
    times = {}  # seconds of the 1k runs, to tell whether the 10k ones fit
    for algorithm in ("emmet", "memit"):
        done = run(f"{name}:{algorithm}-1k", lambda a=algorithm: batch_stage(loaded, facts[: 1000 // scale], a,
                                                                             overrides), 60)
        ran = f"{name}:{algorithm}-1k" in bench.results["stages"]
        if done:  # what grows with the facts: C0 and templates were paid for once
            took = done["phases"]
            times[algorithm] = took["total"] - took.get("stats", 0.0) - took.get("templates", 0.0)
        else:
            times[algorithm] = math.inf if ran else 0.0
    run(f"{name}:eval", lambda: eval_stage(loaded, data, overrides, tiny), 20)
    run(f"{name}:workspace", lambda: workspace_stage(loaded, facts, overrides), 20)
    for algorithm in ("emmet", "memit"):  # float32 weights, values at precision_10k; the 1k runs are float32
        reserve = 0 if chosen else 120  # on a full run, keep ~2 min for the other models
        run(f"{name}:{algorithm}-10k", lambda a=algorithm: batch_stage(
            loaded, facts[: 10_000 // scale], a, {**overrides, "value_precision": precision_10k}),
            10 * times[algorithm] + reserve)


if __name__ == "__main__":
    main()
