"""The evaluation runner behind ``emmet eval``: chunks of B records, each applied as one
batch (ROME: fact by fact), evaluated before and after, then restored (never restored
with ``sequential``). One JSON line per record in ``records.jsonl``; an interrupted run
resumes from it (a sequential one from the edited weights saved after each chunk in
``state.safetensors``, else by redoing the finished edits). ``summary.json`` holds the averages and everything needed to
reproduce them (model fingerprint, hyper-parameters, seed, versions); until the run is
complete, ``progress.json`` holds the same for the records done so far.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .data import Dataset, EvalRecord
from .diskcache import digest, read_json, write_json
from .editor import Editor, EditResult, combined_norms
from .errors import EditError
from .evaluate import score_records, summarise
from .lifelong import Watch, heldout_documents, measure, retention_sample
from .metrics import mean_delta_norm
from .models import cache_dir
from .provenance import versions

log = logging.getLogger(__name__)

# Small chunks (ROME's single facts above all) would run the value optimisation on a
# handful of prompts per pass; instead v* of the next WARM_AHEAD records (or of the next
# chunk, if larger) are optimised together and cached, which is exact because a fact's v*
# ignores the rest of its batch. It also gives the value phase a progress bar of its own.
WARM_AHEAD = 64
STATE_FILE = "state.safetensors"  # a sequential run's edited weights after a chunk
STATE_EVERY = 60.0  # seconds between saves of it (ROME's one-fact chunks take a few seconds each)


@dataclass
class EvalConfig:
    algorithm: str
    batch_size: int = 1
    sequential: bool = False
    generation_every: int = 1  # GE on every G-th record (generation is the slow part)
    gen_tokens: int = 100
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # hyper-parameter overrides
    data: str | None = None  # where the records came from, and from which one on (recorded)
    offset: int = 0
    # Lifelong runs (sequential): measure the model every K edits (lifelong.py) into curves.jsonl.
    checkpoint_every: int | None = None
    retention: int = 200  # facts of the run re-scored at each checkpoint (a fixed, even sample)
    heldout: int = 100  # untouched facts watched at each checkpoint (given to run_eval)
    documents: int = 50  # held-out corpus documents for perplexity


def _done_ids(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: redo that record
            break
    return lines


def run_eval(editor: Editor, dataset: Dataset, config: EvalConfig, out: Path, model_name: str,
             progress: bool = True, heldout: list[EvalRecord] | None = None) -> dict:
    """Run (or resume) the evaluation; return the summary also written to ``out``.
    ``heldout``: facts a lifelong run never edits, watched at its checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    done = _done_ids(records_path)
    key = _config_key(config, editor, dataset)
    if done and done[0].get("config") != key:
        differ = sorted(k for k in key if (done[0].get("config") or {}).get(k) != key[k])
        raise EditError(f"{records_path} was written by another run (it differs in {', '.join(differ)}); "
                        "use a new --out directory")
    hp = editor.hparams(config.algorithm, seed=config.seed, **config.overrides)
    # Layers, conflicting facts within a chunk, lengths: refused before any record is scored.
    editor.check(hp, [r.request for r in dataset.records], batch_size=config.batch_size)
    chunks = [dataset.records[i : i + config.batch_size] for i in range(0, len(dataset.records), config.batch_size)]
    if len(done) % config.batch_size and len(done) < len(dataset.records):  # cut inside a chunk: redo all of it
        done = done[: len(done) - len(done) % config.batch_size]
    records_path.write_text("".join(json.dumps(line) + "\n" for line in done), encoding="utf-8")
    state_path = out / STATE_FILE
    curves = _Curves(out, editor, dataset, config, hp, heldout or [], len(done)) if config.checkpoint_every else None
    # After the curves took their reference from the original weights:
    restored = _restore(editor, state_path, key, len(done), hp) if config.sequential and done else 0
    started = time.perf_counter()
    software = versions()  # read once: the code that runs, even if the checkout changes meanwhile
    prior = _prior_seconds(out) if done else 0.0  # time spent before an interruption
    warmed = 0  # records whose v* are in the value cache already
    saved = float("-inf")  # when the state was last saved
    with tqdm(total=len(dataset.records), initial=len(done), unit="rec", desc=f"eval {config.algorithm}",
              file=sys.stderr, disable=not progress) as bar, records_path.open("a", encoding="utf-8") as handle:
        for index, chunk in enumerate(chunks):
            first = index * config.batch_size
            if first + len(chunk) <= len(done):
                if config.sequential and first >= restored:  # replay finished edits the state lacks, unscored
                    _apply(editor, chunk, hp, config)
                continue
            if not config.sequential and first >= warmed:
                ahead = dataset.records[first : first + max(config.batch_size, WARM_AHEAD)]
                _warm(editor, [r.request for r in ahead], hp, progress)
                warmed = first + len(ahead)
            generation = [(first + j) % max(config.generation_every, 1) == 0 for j in range(len(chunk))]
            original = editor.ledger.is_original  # the unedited model: its scores can come from the baseline cache
            pre = _baseline(editor, chunk, dataset.kind, generation, config) if original else \
                score_records(editor.loaded, chunk, dataset.kind, generation, config.gen_tokens, config.seed)
            results = _apply(editor, chunk, hp, config)
            post = score_records(editor.loaded, chunk, dataset.kind, generation, config.gen_tokens, config.seed)
            norms = combined_norms(results)  # every fact of a ROME chunk, not just its last
            for record, before, after in zip(chunk, pre, post):
                line = {"case_id": record.case_id, "chunk": index, "pre": before, "post": after,
                        "delta_norms": {str(k): v for k, v in norms.items()}, "config": key}
                handle.write(json.dumps(line) + "\n")
                done.append(line)
            handle.flush()
            if not config.sequential:
                editor.reset()
            elif time.perf_counter() - saved >= STATE_EVERY or len(done) == len(dataset.records):
                _save_state(editor, state_path, key, len(done), keys=hp.algorithm == "alphaedit")
                saved = time.perf_counter()
            if curves is not None:
                curves.after(len(done), post, prior + time.perf_counter() - started)
            bar.update(len(chunk))
            if len(done) < len(dataset.records):
                _write_summary(out, editor, dataset, config, hp, done, model_name,
                               prior + time.perf_counter() - started, software, complete=False)
    return _write_summary(out, editor, dataset, config, hp, done, model_name, prior + time.perf_counter() - started,
                          software, complete=True)


def _save_state(editor: Editor, path: Path, key: dict, records: int, keys: bool) -> None:
    """The edited weights after ``records`` records (and the keys of every edit, for
    AlphaEdit), so that a resume starts from here instead of redoing the edits. Written
    whole, then renamed: never half a file. A failed write costs only a slower resume."""
    from safetensors.torch import save_file

    partial = path.with_suffix(".partial")
    try:
        save_file(editor.snapshot(keys=keys), partial, metadata={"records": str(records), "config": digest(key)})
        partial.replace(path)
    except OSError as exc:
        log.warning("could not save the run's state to %s (%s); a resume will redo the edits", path, exc)


def _restore(editor: Editor, path: Path, key: dict, done: int, hp) -> int:
    """Put the edits of a sequential run back from its saved state; returns how many
    records it covers (0: none usable, every finished chunk is replayed instead)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as handle:
            meta = handle.metadata() or {}
            records = int(meta.get("records", -1))
            if meta.get("config") != digest(key) or not 0 < records <= done:
                log.warning("not resuming from %s (another run's, or not within records.jsonl): replaying the "
                            "finished edits", path)
                return 0
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        editor.restore(tensors, hp)
    except (OSError, ValueError, SafetensorError, EditError) as exc:  # missing, torn or not this run's: replay
        if path.exists():
            log.warning("not resuming from %s (%s): replaying the finished edits", path, exc)
        return 0
    return records


class _Curves:
    """The checkpoints of a lifelong run, one JSON line each in ``curves.jsonl`` (kept on
    resume: a line is written only once the edits it measures are in ``records.jsonl``)."""

    def __init__(self, out: Path, editor: Editor, dataset: Dataset, config: EvalConfig, hp, heldout: list,
                 done: int) -> None:
        if not config.sequential:
            raise EditError("--checkpoint-every measures a lifelong run: add --sequential")
        self.path, self.editor, self.kind = out / "curves.jsonl", editor, dataset.kind
        self.every = config.checkpoint_every
        self.total, self.layers = len(dataset.records), list(hp.layers)
        adapter = editor.loaded.adapter  # the model is still the original: a resume replays later
        self.watch = Watch(retention_sample(dataset.records, config.retention), heldout,
                           heldout_documents(hp.stats_corpus, config.documents, hp.stats_tokens,
                                             editor.loaded.tokenizer) if config.documents else [],
                           gen_tokens=config.gen_tokens, seed=config.seed,
                           weight_norms={layer: float(adapter.weight(layer).float().norm()) for layer in hp.layers})
        lines = [line for line in _done_ids(self.path) if line.get("edits", 0) <= done]
        self.path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        self.last = lines[-1]["edits"] if lines else None
        if self.last is None:  # the unedited model: the curves' starting point
            self._write(0, None, 0.0)

    def after(self, edited: int, newest: list[dict], seconds: float) -> None:
        if edited // self.every > (self.last or 0) // self.every or edited == self.total:
            self._write(edited, newest, seconds)

    def _write(self, edited: int, newest: list[dict] | None, seconds: float) -> None:
        started = time.perf_counter()
        line = measure(self.editor, self.watch, edited, newest, self.kind, self.layers)
        line.update(seconds=seconds, checkpoint_seconds=time.perf_counter() - started)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        self.last = edited


def _warm(editor: Editor, requests: list, hp, progress: bool) -> None:
    """Optimise (or find cached) the v* of ``requests``, with a progress bar of facts."""
    with tqdm(total=len(requests), unit="fact", desc="  v*", file=sys.stderr, leave=False,
              disable=not progress) as bar:
        editor.warm_values(requests, hp, progress=bar.update)


def _write_summary(out: Path, editor: Editor, dataset: Dataset, config: EvalConfig, hp, done: list[dict],
                   model_name: str, seconds: float, software: dict, complete: bool) -> dict:
    """``summary.json`` when the run is complete; ``progress.json`` (same fields, the
    records so far) after every chunk before that, so a long run can be read early."""
    summary = {
        "model": model_name, "model_fingerprint": editor.loaded.fingerprint, "algorithm": config.algorithm,
        "device": editor.loaded.placement(), "dtype": str(next(editor.loaded.model.parameters()).dtype),
        "data": dataset.name, "n": len(done), "n_planned": len(dataset.records), "complete": complete,
        "skipped": len(dataset.skipped), "batch_size": config.batch_size, "sequential": config.sequential,
        "pre": summarise([d["pre"] for d in done]), "post": summarise([d["post"] for d in done]),
        "mean_delta_norm": mean_delta_norm(done), "seconds": seconds, "hparams": hp.to_dict(),
        "seed": config.seed, "eval_config": asdict(config),
        "versions": software,
    }
    name = "summary.json" if complete else "progress.json"
    (out / name).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if complete:
        (out / "progress.json").unlink(missing_ok=True)
    return summary


def _prior_seconds(out: Path) -> float:
    try:
        return float(json.loads((out / "progress.json").read_text(encoding="utf-8"))["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _apply(editor: Editor, chunk: list[EvalRecord], hp, config: EvalConfig) -> list[EditResult]:
    requests = [r.request for r in chunk]
    # v* may come from the disk cache (computed by an earlier run at another batch size)
    # for facts applied to the unedited model; the Editor checks that with its ledger.
    if config.algorithm == "rome":  # ROME edits one fact at a time
        return [editor.apply([request], hparams=hp, refuse_current=False, cache_values=True) for request in requests]
    return [editor.apply(requests, hparams=hp, refuse_current=False, cache_values=True)]


def _baseline(editor: Editor, chunk: list[EvalRecord], kind: str, generation: list[bool],
              config: EvalConfig) -> list[dict[str, float]]:
    """Pre-edit scores of the unedited model, cached on disk per record: every run on the
    same model and records shares them (GE texts are seeded per prompt, so they do not
    depend on the chunk either)."""
    folder = cache_dir() / "baselines" / digest(editor.loaded.fingerprint)
    keys = [_record_key(r, kind, g, config) for r, g in zip(chunk, generation)]
    rows: dict[int, dict] = {}
    for i, key in enumerate(keys):
        row = read_json(folder / f"{key}.json")  # None if missing, torn or edited
        if isinstance(row, dict) and "ES" in row and all(isinstance(v, int | float) for v in row.values()):
            rows[i] = row
    todo = [i for i in range(len(chunk)) if i not in rows]
    if todo:
        fresh = score_records(editor.loaded, [chunk[i] for i in todo], kind, [generation[i] for i in todo],
                              config.gen_tokens, config.seed)
        for i, row in zip(todo, fresh):
            rows[i] = row
            write_json(folder / f"{keys[i]}.json", row)
    return [rows[i] for i in range(len(chunk))]


def _record_key(record: EvalRecord, kind: str, generation: bool, config: EvalConfig) -> str:
    payload = {"request": vars(record.request), "paraphrase": record.paraphrase_prompts,
               "neighborhood": [record.neighborhood_prompts, record.neighborhood_targets],
               "generation": record.generation_prompts if generation else None, "kind": kind,
               "gen_tokens": config.gen_tokens, "seed": config.seed, "metrics": 3}
    return digest(payload)


def _config_key(config: EvalConfig, editor: Editor, dataset: Dataset) -> dict:
    """What a resumed run must share with the one that wrote ``records.jsonl``: the
    settings, the model (its fingerprint counts its dtype) and the very records, in order
    (so another data file, --offset or --n is caught, not skipped over by position)."""
    records = [[r.case_id, vars(r.request)] for r in dataset.records]
    return {"algorithm": config.algorithm, "batch_size": config.batch_size, "sequential": config.sequential,
            "seed": config.seed, "overrides": config.overrides, "model": editor.loaded.fingerprint,
            "records": digest(records), "checkpoint_every": config.checkpoint_every}
