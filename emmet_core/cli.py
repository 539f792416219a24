"""``emmet``: a thin command line over the library.

    emmet edit --model smollm2-135m --algo rome --prompt "The mother tongue of {} is" \\
        --subject "Danielle Darrieux" --target English --json
    emmet stats --model smollm2-135m --layers 4 --tokens 100000

Progress goes to stderr; bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EditError
from .provenance import versions

if TYPE_CHECKING:
    from .models import LoadedModel
    from .request import EditRequest


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``--layers``: None when not given, else :func:`hparams.parse_layers`."""
    from .hparams import parse_layers as parse

    return parse(text) if text else None


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="offline alias, hub id or local directory")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1...")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model over several GPUs with accelerate: auto, balanced, sequential, "
                             "or a JSON object (or .json file) of module -> device; replaces --device")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--corpus", default=None, help="covariance corpus: wiki-offline, a file, or hf:NAME")
    parser.add_argument("--tokens", type=int, default=None, help="covariance token budget")


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="hparam",
                        help="override any hyper-parameter, e.g. --set value_precision=bfloat16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmet", description="Edit facts in language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="apply one edit (or a JSON file of edits) and report its effect")
    _model_args(edit)
    add_set_argument(edit)
    edit.add_argument("--algo", default="rome", help="rome, memit, emmet, alphaedit or encore")
    edit.add_argument("--prompt", help='relation prompt with {} for the subject, or containing it')
    edit.add_argument("--subject")
    edit.add_argument("--target", help="the new object")
    edit.add_argument("--target-true", help="the old object (default: the model's greedy answer)")
    edit.add_argument("--requests", help="JSON list of {prompt, subject, target_new[, target_true]}")
    edit.add_argument("--layers", help="layers to edit, e.g. 4 or 3-5 (default: the preset's)")
    edit.add_argument("--seed", type=int, default=None, help="seed for context templates")
    edit.add_argument("--steps", type=int, default=None, help="value optimisation steps")
    edit.add_argument("--save", help="write the edited model to this directory")
    edit.add_argument("--json", action="store_true", help="print one JSON object")

    ev = sub.add_parser("eval", help="evaluate an algorithm on CounterFact or zsRE records")
    _model_args(ev)
    add_set_argument(ev)
    ev.add_argument("--algo", default="rome", help="rome, memit, emmet, alphaedit or encore")
    ev.add_argument("--data", help="dataset file (either CounterFact layout, or zsRE) or hf:NAME[:SPLIT]")
    ev.add_argument("--n", type=int, default=None, help="number of records (default: all)")
    ev.add_argument("--offset", type=int, default=0, help="skip the first K records")
    ev.add_argument("--batch-size", type=int, default=1, help="records applied as one batch")
    ev.add_argument("--sequential", action="store_true", help="never restore the weights between batches")
    ev.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                    help="lifelong runs (--sequential): measure the model every K edits into curves.jsonl")
    ev.add_argument("--retention", type=int, default=200, help="edited facts re-scored at each checkpoint")
    ev.add_argument("--heldout", type=int, default=100,
                    help="facts of the data file outside the run, watched at each checkpoint")
    ev.add_argument("--documents", type=int, default=50, help="held-out corpus documents for perplexity")
    ev.add_argument("--generation-every", type=int, default=1, help="generation entropy on every G-th record")
    ev.add_argument("--gen-tokens", type=int, default=100, help="tokens generated per prompt for GE")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--layers", help="layers to edit (default: the preset's)")
    ev.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records")
    ev.add_argument("--out", help="output directory (summary.json, records.jsonl)")
    ev.add_argument("--plot", nargs="+", metavar="DIR", help="instead: plot the summaries in these directories")

    stats = sub.add_parser("stats", help="precompute the covariance statistics C0")
    _model_args(stats)
    stats.add_argument("--layers", required=True, help="layers, e.g. 4 or 3-5")
    stats.add_argument("--dtype-stats", default="float64", choices=["float32", "float64"])
    stats.add_argument("--precision", default="float32", choices=["float32", "tf32", "bfloat16"],
                       help="the forward's matrix products (tf32: CUDA tensor cores); sums stay --dtype-stats")
    return parser


def parse_device_map(text: str | None) -> str | dict | None:
    """``--device-map``: a name accelerate knows, or a JSON object inline or in a file."""
    if not text:
        return None
    source = text
    if text.endswith(".json"):
        try:
            source = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise EditError(f"cannot read --device-map {text}: {exc.strerror or exc}") from None
    if source.lstrip().startswith("{"):
        try:
            mapping = json.loads(source)
        except json.JSONDecodeError as exc:
            raise EditError(f"--device-map is not valid JSON: {exc.msg}") from None
        if not isinstance(mapping, dict):
            raise EditError("--device-map must be a JSON object of module -> device")
        return mapping
    return text


def load(args: argparse.Namespace) -> LoadedModel:
    """The model the command works on, placed by --device or --device-map."""
    from .models import load_model

    device_map = parse_device_map(args.device_map)
    if device_map is not None:
        return load_model(args.model, device=args.device, dtype=args.dtype, device_map=device_map)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def parse_sets(items: list[str]) -> dict[str, object]:
    """``["kl_factor=0.1", "layers=[3, 4]"]`` -> overrides, values read as YAML scalars/lists."""
    import yaml

    found = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise EditError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            found[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise EditError(f"--set {key.strip()}: cannot read the value {text!r}") from None
    return found


def _requests(args: argparse.Namespace) -> list[EditRequest]:
    """The requests of ``emmet edit``, checked as far as text goes (before any model loads)."""
    from .request import check_conflicts, request_from

    if args.requests:
        try:
            with open(args.requests, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise EditError(f"cannot read --requests {args.requests}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EditError(f"--requests {args.requests} is not a JSON file") from None
        if not isinstance(data, list) or not data:
            raise EditError("--requests must hold a non-empty JSON list of objects")
        batch = [request_from(item, f"--requests item {i + 1}") for i, item in enumerate(data)]
    else:
        missing = [name for name in ("prompt", "subject", "target") if getattr(args, name) in (None, "")]
        if missing:
            raise EditError(f"missing --{', --'.join(missing)} (or give --requests FILE)")
        batch = [request_from({"prompt": args.prompt, "subject": args.subject, "target_new": args.target,
                               "target_true": args.target_true})]
    check_conflicts(batch)
    return batch


def overrides(args: argparse.Namespace, flags: dict[str, object]) -> dict[str, object]:
    """Hyper-parameter overrides from a command's own flags and its ``--set`` items; a
    key given both ways is refused rather than one of them silently winning."""
    given = {k: v for k, v in flags.items() if v is not None}
    sets = parse_sets(args.hparam)
    for key, value in sets.items():
        if key in given:
            flag = {"v_num_grad_steps": "steps", "stats_corpus": "corpus", "stats_tokens": "tokens"}.get(key, key)
            raise EditError(f"--set {key}=… repeats --{flag.replace('_', '-')}; give it once")
        if key == "algorithm":
            raise EditError("--set algorithm=… is not a hyper-parameter here; use --algo")
        if key == "layers" and isinstance(value, int | str) and not isinstance(value, bool):
            value = parse_layers(str(value))  # --set layers=4 or layers=3-5, like --layers
        given[key] = value
    return given


def writable_dir(path: str, what: str) -> Path:
    """Make sure ``path`` can hold output before any work starts."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".emmet-write-check-"):
            pass
    except OSError as exc:
        raise EditError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return folder


def at_least(value: int | None, low: int, flag: str) -> None:
    if value is not None and value < low:
        raise EditError(f"{flag} must be ≥ {low}, not {value}")


def _preset_check(args: argparse.Namespace, given: dict[str, object]) -> None:
    """Validate the hyper-parameters against the model's preset before loading it (a
    model without a preset is checked once loaded, against the generic fallback)."""
    from .hparams import load_preset

    try:
        preset = load_preset(args.model, args.algo)
    except EditError as exc:
        if "no preset" in str(exc):
            return
        raise
    preset.replace(**given)


def cmd_edit(args: argparse.Namespace) -> dict:
    from .editor import Editor
    from .readout import generate, score_targets
    from .stats import check_corpus

    requests = _requests(args)
    given = overrides(args, {"layers": parse_layers(args.layers), "seed": args.seed,
                             "v_num_grad_steps": args.steps, "stats_corpus": args.corpus,
                             "stats_tokens": args.tokens})
    _preset_check(args, given)
    if args.corpus:
        check_corpus(args.corpus)
    if args.save:
        writable_dir(args.save, "--save")
    started = time.perf_counter()
    loaded = load(args)
    load_seconds = time.perf_counter() - started
    def tell(phase: str) -> None:  # phase names only; the steps inside a phase are for progress bars
        if ":" not in phase:
            print(f"[emmet] {phase}", file=sys.stderr)

    editor = Editor(loaded, on_phase=tell)
    hp = editor.hparams(args.algo, **given)
    batch = editor.prepare(editor.check(hp, requests))
    prompts = [r.text for r in batch]

    def probabilities() -> list[dict]:
        new = score_targets(loaded, prompts, [r.target_new for r in batch])
        true = score_targets(loaded, prompts, [r.target_true for r in batch])
        return [{"p_new": a.prob, "p_true": b.prob} for a, b in zip(new, true)]

    before, gen_before = probabilities(), generate(loaded, prompts)
    result = editor.apply(batch, hparams=hp, refuse_current=False)  # checked by prepare() above
    after, gen_after = probabilities(), generate(loaded, prompts)
    if args.save:
        editor.save_pretrained(args.save)
    edits = [
        {"prompt": r.text, "subject": r.subject, "target_new": r.target_new, "target_true": r.target_true,
         "before": b, "after": a, "generation_before": gb, "generation_after": ga}
        for r, b, a, gb, ga in zip(batch, before, after, gen_before, gen_after)
    ]
    phases = {k: v for k, v in result.seconds.items() if k != "total"}
    seconds = {"load": load_seconds, **phases, "edit": result.seconds["total"],
               "total": time.perf_counter() - started}
    report = {"model": args.model, "model_fingerprint": loaded.fingerprint, "algorithm": hp.algorithm,
              "layers": list(hp.layers), **{k: v for k, v in edits[0].items() if k != "prompt"},
              "prompt": edits[0]["prompt"], "edits": edits, "delta_norms": result.to_dict()["delta_norms"],
              "seconds": seconds, "hparams": hp.to_dict(), "device": loaded.placement(), "versions": versions()}
    return report


def _print_edit(report: dict) -> None:
    for edit in report["edits"]:
        b, a = edit["before"], edit["after"]
        print(f"{edit['prompt']!r}: {edit['target_true']!r} -> {edit['target_new']!r}")
        print(f"  P(new)  {b['p_new']:.4f} -> {a['p_new']:.4f}")
        print(f"  P(true) {b['p_true']:.4f} -> {a['p_true']:.4f}")
        print(f"  before: {edit['generation_before'].strip()!r}")
        print(f"  after:  {edit['generation_after'].strip()!r}")
    norms = ", ".join(f"L{k}: {v:.3g}" for k, v in report["delta_norms"].items())
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in report["seconds"].items())
    print(f"{report['algorithm'].upper()} on layers {report['layers']}; ‖Δ‖ {norms}\n  {phases}")


def cmd_stats(args: argparse.Namespace) -> dict:
    import torch

    from .stats import DEFAULT_CORPUS, check_corpus, layer_covariances

    layers = parse_layers(args.layers) or ()
    at_least(args.tokens, 1, "--tokens")
    corpus, tokens = args.corpus or DEFAULT_CORPUS, args.tokens or 100_000
    check_corpus(corpus)
    loaded = load(args)
    started = time.perf_counter()
    covs = layer_covariances(loaded, list(layers), corpus, tokens, getattr(torch, args.dtype_stats),
                             precision=args.precision)
    seconds = time.perf_counter() - started
    for layer, cov in covs.items():
        print(f"layer {layer}: C0 {tuple(cov.shape)}, trace {float(cov.trace()):.4g}")
    print(f"{len(covs)} layer(s), {tokens} tokens of {corpus}, {seconds:.1f}s on {loaded.placement()}")
    return {"layers": list(covs), "seconds": seconds}


def cmd_eval(args: argparse.Namespace) -> dict:
    from .data import load_dataset

    if args.plot:
        from .plots import curves_table, plot_batch_sizes, plot_curves, results_table

        out = Path(args.out or args.plot[0])
        directories = [Path(p) for p in args.plot]
        lifelong = [d for d in directories if (d / "curves.jsonl").is_file()]
        rest = [d for d in directories if d not in lifelong]
        paths = (plot_curves(lifelong, out) if lifelong else []) + (plot_batch_sizes(rest, out) if rest else [])
        table = results_table(directories) + (f"\n{curves_table(lifelong)}" if lifelong else "")
        (out / "table.md").write_text(table, encoding="utf-8")
        print(table)
        for path in [*paths, out / "table.md"]:
            print(path)
        return {}
    if not args.data or not args.out:
        raise EditError("emmet eval needs --data and --out (or --plot DIR...)")
    from .editor import Editor
    from .runner import EvalConfig, run_eval
    from .stats import check_corpus

    for value, low, flag in ((args.n, 1, "--n"), (args.offset, 0, "--offset"), (args.batch_size, 1, "--batch-size"),
                             (args.generation_every, 1, "--generation-every"), (args.gen_tokens, 1, "--gen-tokens"),
                             (args.tokens, 1, "--tokens"), (args.checkpoint_every, 1, "--checkpoint-every"),
                             (args.retention, 1, "--retention"), (args.heldout, 0, "--heldout"),
                             (args.documents, 0, "--documents")):
        at_least(value, low, flag)
    if args.checkpoint_every and not args.sequential:
        raise EditError("--checkpoint-every measures a lifelong run: add --sequential")
    given = overrides(args, {"layers": parse_layers(args.layers), "stats_corpus": args.corpus,
                             "stats_tokens": args.tokens, "seed": args.seed})
    _preset_check(args, given)
    given.pop("seed")  # the run's own setting (EvalConfig.seed)
    if args.corpus:
        check_corpus(args.corpus)
    dataset = load_dataset(args.data, skip_bad=args.skip_bad)
    end = len(dataset.records) if args.n is None else args.offset + args.n
    # Facts the run never edits (after its range, then before it), watched at checkpoints.
    outside = dataset.records[end:] + dataset.records[: args.offset]
    heldout = outside[: args.heldout] if args.checkpoint_every else []
    dataset.records = dataset.records[args.offset : end]
    if not dataset.records:
        raise EditError(f"no records left after --offset {args.offset} --n {args.n}")
    out = writable_dir(args.out, "--out")
    loaded = load(args)
    config = EvalConfig(args.algo, args.batch_size, args.sequential, args.generation_every, args.gen_tokens,
                        args.seed, given, data=args.data, offset=args.offset, checkpoint_every=args.checkpoint_every,
                        retention=args.retention, heldout=len(heldout), documents=args.documents)
    summary = run_eval(Editor(loaded), dataset, config, out, args.model, heldout=heldout)
    pre, post = summary["pre"], summary["post"]
    for name in post:
        print(f"{name:>3}  {pre.get(name, float('nan')):7.2f} -> {post[name]:7.2f}")
    print(f"{summary['n']} records, {summary['seconds']:.0f}s; wrote {args.out}/summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="[emmet] %(levelname)s %(message)s")
    try:
        if args.command == "edit":
            report = cmd_edit(args)
            print(json.dumps(report, indent=2)) if args.json else _print_edit(report)
        elif args.command == "eval":
            cmd_eval(args)
        else:
            cmd_stats(args)
    except EditError as exc:
        print(f"emmet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # On a line of its own: a progress bar may have been half-drawn when Ctrl-C came.
        print("\nemmet: interrupted (an eval resumes from its --out folder)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
