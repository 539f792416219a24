"""Caches that can never hold the wrong thing: every part of every key, changed alone,
misses the cache (a new file), and a file whose bytes changed after it was written is
recomputed, never used. The model is a tiny Llama saved to disk and loaded by path, the
way a user's local model is, in float32 and in bfloat16."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, make_model, make_tokenizer

from emmet_core import Editor, load_model
from emmet_core.data import Dataset, EvalRecord
from emmet_core.diskcache import read_json, write_json
from emmet_core.request import EditRequest
from emmet_core.runner import EvalConfig, run_eval
from emmet_core.stats import layer_covariances
from emmet_core.templates import context_templates
from emmet_core.value_cache import cached_values
from emmet_core.values import ValueConfig

FACT = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
TEMPLATES = ["{}", "Yes. {}"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    tokenizer = make_tokenizer("sp")
    path = tmp_path_factory.mktemp("llama")
    make_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    return str(path)


def files(root: Path, pattern: str) -> set[Path]:
    return set(root.rglob(pattern))


def test_the_model_fingerprint_counts_the_load_dtype(saved):
    full, half = load_model(str(saved), device="cpu"), load_model(str(saved), device="cpu", dtype="bfloat16")
    assert full.fingerprint != half.fingerprint
    assert load_model(str(saved), device="cpu").fingerprint == full.fingerprint  # and nothing else


def test_c0_key_parts(saved, corpus, tmp_path, isolated_cache):
    full, half = load_model(str(saved), device="cpu"), load_model(str(saved), device="cpu", dtype="bfloat16")
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("\n\n".join(reversed(CORPUS * 8)), encoding="utf-8")
    base = dict(loaded=full, layers=[1], corpus=corpus, n_tokens=400, dtype=torch.float64, precision="float32")
    variants = [{}, {"loaded": half}, {"layers": [2]}, {"corpus": str(other_corpus)}, {"n_tokens": 500},
                {"dtype": torch.float32}, {"precision": "bfloat16"}]
    for count, change in enumerate(variants, start=1):
        layer_covariances(**{**base, **change}, progress=False)
        assert len(files(isolated_cache / "stats", "*.safetensors")) == count, change
    layer_covariances(**base, progress=False)  # the first again: a hit
    assert len(files(isolated_cache / "stats", "*.safetensors")) == len(variants)


def test_template_key_parts_and_a_damaged_file(saved, isolated_cache):
    full, half = load_model(str(saved), device="cpu"), load_model(str(saved), device="cpu", dtype="bfloat16")
    first = context_templates(full, [[3, 2]], seed=0)
    for count, (loaded, recipe, seed, top_k) in enumerate(
            [(half, [[3, 2]], 0, 5), (full, [[4, 2]], 0, 5), (full, [[3, 2]], 1, 5), (full, [[3, 2]], 0, 4)], start=2):
        context_templates(loaded, recipe, seed=seed, top_k=top_k)
        assert len(files(isolated_cache / "templates", "*.json")) == count
    (path,) = [p for p in files(isolated_cache / "templates", "*.json")
               if (read_json(p) or {}).get("templates") == first]
    path.write_text(path.read_text(encoding="utf-8").replace("{}", "{} {}", 1), encoding="utf-8")  # edited
    assert context_templates(full, [[3, 2]], seed=0) == first
    path.write_text(path.read_text(encoding="utf-8")[:40], encoding="utf-8")  # truncated
    assert context_templates(full, [[3, 2]], seed=0) == first
    path.write_bytes(b"\xff\xfe not utf-8")
    assert context_templates(full, [[3, 2]], seed=0) == first
    assert read_json(path)["templates"] == first  # rewritten whole


def test_value_key_parts_and_a_flipped_bit(saved, isolated_cache):
    full, half = load_model(str(saved), device="cpu"), load_model(str(saved), device="cpu", dtype="bfloat16")
    config = ValueConfig(steps=3)
    first = cached_values(full, [FACT], TEMPLATES, 1, "residual", config)
    (path,) = files(isolated_cache / "values", "*.safetensors")
    variants = [dict(loaded=half), dict(layer=2), dict(site="mlp"), dict(templates=["{}", "No. {}"]),
                dict(requests=[dataclasses.replace(FACT, target_new="German")])]
    variants += [dict(config=dataclasses.replace(config, **{name: value}))
                 for name, value in (("steps", 4), ("lr", 0.4), ("weight_decay", 0.4), ("clamp", 0.5),
                                     ("kl_factor", 0.1), ("stop_loss", 0.01), ("seed", 1),
                                     ("precision", "bfloat16"))]
    base = dict(loaded=full, requests=[FACT], templates=TEMPLATES, layer=1, site="residual", config=config)
    for count, change in enumerate(variants, start=2):
        cached_values(**{**base, **change})
        assert len(files(isolated_cache / "values", "*.safetensors")) == count, change
    cached_values(**{**base, "config": dataclasses.replace(config, rows_per_pass=7)})  # grouping is not content
    assert len(files(isolated_cache / "values", "*.safetensors")) == len(variants) + 1
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's payload
    path.write_bytes(bytes(data))
    again = cached_values(full, [FACT], TEMPLATES, 1, "residual", config)
    assert again.steps > 0  # recomputed, not read
    assert torch.allclose(again.values, first.values, atol=1e-5)


def test_baselines_key_on_dtype_and_are_checked(saved, corpus, tmp_path, isolated_cache):
    record = EvalRecord(0, FACT, ["Danielle Darrieux grew up speaking"], [], [], [])
    dataset = Dataset("tiny", "counterfact", [record])
    overrides = {"layers": [2], "v_num_grad_steps": 2, "context_templates": [[3, 2]], "stats_corpus": corpus,
                 "stats_tokens": 400}
    config = EvalConfig("emmet", gen_tokens=2, overrides=overrides)

    def pre(loaded, out: str) -> dict:
        run_eval(Editor(loaded), dataset, config, tmp_path / out, "tiny", progress=False)
        return json.loads((tmp_path / out / "records.jsonl").read_text().splitlines()[0])["pre"]

    full, half = load_model(str(saved), device="cpu"), load_model(str(saved), device="cpu", dtype="bfloat16")
    expected = pre(full, "a")
    (path,) = files(isolated_cache / "baselines", "*.json")
    assert pre(half, "b") != expected  # bfloat16 scores its own baseline
    assert len(files(isolated_cache / "baselines", "*.json")) == 2
    envelope = json.loads(path.read_text(encoding="utf-8"))
    envelope["data"]["ES"] = 1.0 - envelope["data"]["ES"]  # someone edited the numbers
    path.write_text(json.dumps(envelope), encoding="utf-8")
    assert pre(full, "c") == expected
    path.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert pre(full, "d") == expected
    write_json(path, {"not": "a row"})
    assert pre(full, "e") == expected
