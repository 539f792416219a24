"""One owner of the weights (emmet_core.ledger): deltas are data in the weight's dtype,
replays are exact, edits are computed in a scratch block, and every cache is computed
from the original weights whatever the model holds when it is first needed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, make_tokenizer, same_weights, tiny, tiny_hparams, weights_of

from emmet_core import Editor
from emmet_core.data import Dataset, EvalRecord
from emmet_core.editor import combined_norms
from emmet_core.errors import NumericalError
from emmet_core.ledger import Delta, Ledger
from emmet_core.models import prepare
from emmet_core.request import EditRequest
from emmet_core.runner import EvalConfig, run_eval
from emmet_core.stats import layer_covariances
from emmet_core.templates import context_templates

DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
BERLIN = EditRequest("{} is the capital of", "Berlin", "Italy", "Germany")


def test_compute_changes_nothing_and_apply_adds_exactly_its_deltas(tokenizers, isolated_cache, corpus_file):
    loaded = tiny("gpt2", tokenizers)
    editor = Editor(loaded)
    saved = weights_of(loaded.model)
    result = editor.compute([DARRIEUX, BERLIN], hparams=tiny_hparams(editor, "memit", corpus_file))
    assert same_weights(loaded.model, saved) and editor.ledger.is_original
    assert [d.layer for d in result.deltas] == [1, 2] and all(d.change.dtype == torch.float32 for d in result.deltas)
    assert result.deltas[0].change.shape == loaded.adapter.weight(1).shape  # GPT-2 stores Wᵀ, and so does Δ
    editor.ledger.push(result.deltas)
    expected = dict(saved)
    for delta in result.deltas:
        name = loaded.adapter.mlp_out_name(delta.layer) + ".weight"
        expected[name] = saved[name] + delta.change
    assert same_weights(loaded.model, expected)
    editor.ledger.write([])
    assert same_weights(loaded.model, saved)


def test_a_delta_that_overflows_the_weights_is_refused_and_changes_nothing(tokenizers):
    loaded = tiny("llama", tokenizers)
    ledger = Ledger(loaded.adapter)
    saved = weights_of(loaded.model)
    good = Delta.of(loaded.adapter, 1, torch.full_like(loaded.adapter.matrix(1), 1e-3, dtype=torch.float64))
    ledger.push([good])
    huge = Delta.of(loaded.adapter, 2, torch.full_like(loaded.adapter.matrix(2), 3e38, dtype=torch.float64))
    with pytest.raises(NumericalError, match="layer 2"):
        ledger.push([huge, huge])  # each is finite; their sum is not
    assert ledger.applied == (good,)
    ledger.write([])
    assert same_weights(loaded.model, saved)
    with pytest.raises(NumericalError):
        ledger.push([Delta(1, torch.full_like(good.change, float("nan")), False)])
    assert ledger.is_original and same_weights(loaded.model, saved)


def test_templates_and_c0_of_a_later_edit_come_from_the_original_weights(tokenizers, isolated_cache, corpus_file,
                                                                           tmp_path, monkeypatch):
    """ROME first, then EMMET with another template recipe and another layer: what EMMET
    samples and measures must be the unedited model's, not the ROME-edited one's."""
    tokenizer = make_tokenizer("bpe")
    loaded = prepare(make_model("gpt2", len(tokenizer)), tokenizer, "tiny-gpt2", "cpu")
    editor = Editor(loaded)
    editor.apply([DARRIEUX], hparams=tiny_hparams(editor, "rome", corpus_file, layers=(1,),
                                                  context_templates=((3, 2),)))
    emmet = tiny_hparams(editor, "emmet", corpus_file, layers=(2,), context_templates=((4, 3),), seed=5)
    editor.apply([BERLIN], hparams=emmet)  # samples templates and measures C0 of layer 2 now
    monkeypatch.setenv("EMMET_CACHE_DIR", str(tmp_path / "fresh"))
    clean = prepare(make_model("gpt2", len(tokenizer)), tokenizer, "tiny-gpt2", "cpu")
    expected = context_templates(clean, [[4, 3]], seed=5, use_cache=False)
    c0 = layer_covariances(clean, [2], str(corpus_file), 3000, progress=False)[2]
    monkeypatch.setenv("EMMET_CACHE_DIR", str(isolated_cache))
    assert context_templates(loaded, [[4, 3]], seed=5) == expected  # the cached file holds the original's
    assert torch.equal(editor.covariance(2, emmet).cpu(), c0)


def test_a_rome_chunk_reports_the_norm_of_all_its_facts(tokenizers, isolated_cache, corpus_file, tmp_path):
    loaded = tiny("llama", tokenizers)
    editor = Editor(loaded)
    overrides = {"layers": [2], "v_num_grad_steps": 5, "context_templates": [[3, 2]],
                 "stats_corpus": str(corpus_file), "stats_tokens": 3000}
    records = [EvalRecord(i, r, [r.text], [], [], []) for i, r in enumerate([DARRIEUX, BERLIN])]
    run_eval(editor, Dataset("tiny", "counterfact", records), EvalConfig("rome", batch_size=2, gen_tokens=2,
                                                                          overrides=overrides),
             tmp_path / "out", "tiny-llama", progress=False)
    line = json.loads((tmp_path / "out" / "records.jsonl").read_text().splitlines()[0])
    again = Editor(loaded)
    hp = again.hparams("rome", **overrides)
    both = [again.apply([r], hparams=hp, refuse_current=False) for r in (DARRIEUX, BERLIN)]
    assert line["delta_norms"]["2"] == pytest.approx(combined_norms(both)[2], rel=1e-5)
    assert line["delta_norms"]["2"] != pytest.approx(both[-1].norms[2], rel=1e-3)  # not just the last fact's


def test_saved_weights_are_adopted_exactly_and_only_by_an_unedited_model(tokenizers, isolated_cache, corpus_file):
    """A snapshot taken after edits, restored into a fresh copy of the model: the same
    weights bit for bit, the same keys for AlphaEdit; undo gives the originals back."""
    from emmet_core.errors import EditError

    editor = Editor(tiny("gpt2", tokenizers))
    hp = tiny_hparams(editor, "alphaedit", corpus_file)
    editor.apply([DARRIEUX], hparams=hp)
    editor.apply([BERLIN], hparams=hp)
    snapshot = editor.snapshot()
    assert set(snapshot) == {f"{kind}.{layer}" for kind in ("weight", "keys") for layer in hp.layers}
    assert set(editor.snapshot(keys=False)) == {f"weight.{layer}" for layer in hp.layers}
    fresh = Editor(tiny("gpt2", tokenizers))
    original = weights_of(fresh.loaded.model)
    fresh.restore(snapshot, hp)
    assert same_weights(fresh.loaded.model, weights_of(editor.loaded.model))
    assert torch.equal(fresh.snapshot()[f"keys.{hp.layers[0]}"], snapshot[f"keys.{hp.layers[0]}"])
    with pytest.raises(EditError, match="unedited model only"):
        fresh.restore(snapshot, hp)
    fresh.undo()
    assert same_weights(fresh.loaded.model, original) and fresh.ledger.is_original
    other = Editor(tiny("gpt2", tokenizers))
    wrong = {name: t[:-1] if name.startswith("weight.") else t for name, t in snapshot.items()}
    with pytest.raises(EditError, match="saved weights of layer"):
        other.restore(wrong, hp)
    assert same_weights(other.loaded.model, original)
