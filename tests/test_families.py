"""Every adapter family on a tiny random model: the edited layer maps keys to values,
undo/reset are bit-exact, export round-trips, and loading by local path works."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, same_weights, tiny, tiny_hparams, weights_of

from emmet_core import Editor, load_model
from emmet_core.adapter import ModelAdapter
from emmet_core.errors import UnsupportedModelError

FACT = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": "English", "target_true": "French"}
FACTS = [
    FACT,
    {"prompt": "Michel Rocard is a native speaker of", "subject": "Michel Rocard",
     "target_new": "German", "target_true": "French"},
    {"prompt": "{} is the capital of", "subject": "Berlin", "target_new": "Italy", "target_true": "Germany"},
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", ["rome", "emmet"])
def test_edit_maps_key_to_value_and_undo_is_exact(family, algorithm, device, tokenizers, isolated_cache, corpus_file):
    loaded = tiny(family, tokenizers, device)
    adapter = loaded.adapter
    editor = Editor(loaded)
    saved = weights_of(loaded.model)
    facts = [FACT] if algorithm == "rome" else FACTS
    hp = tiny_hparams(editor, algorithm, corpus_file, mom2_update_weight=0.0)  # EMMET ridge 0
    before = {}

    def record(phase: str) -> None:  # W as it is just before the solve
        if phase == "solve":
            before["W"] = adapter.weight(2).detach().clone()

    editor.on_phase = record
    result = editor.apply(facts, hparams=hp)
    (update,) = result.updates
    assert update.layer == 2 and update.keys.shape[1] == len(facts)
    assert not torch.equal(adapter.weight(2), saved[adapter.mlp_out_name(2) + ".weight"])
    # Ŵ K = W0 K + R, i.e. the edited layer maps each key to its value v*.
    after_out = adapter.project(2, update.keys)
    with torch.no_grad():
        adapter.weight(2).copy_(before["W"])
        before_out = adapter.project(2, update.keys)
        update.change.add_to(adapter)
    achieved = after_out - before_out
    error = (achieved - update.residuals.to(achieved)).norm() / update.residuals.norm()
    assert error < 1e-4, f"{family}: relative error {error:.2e}"
    editor.undo()
    assert same_weights(loaded.model, saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_memit_edits_several_layers_and_reset_is_exact(family, device, tokenizers, isolated_cache, corpus_file):
    loaded = tiny(family, tokenizers, device)
    editor = Editor(loaded)
    saved = weights_of(loaded.model)
    if loaded.adapter.spec.post_mlp_norm:  # Gemma 3: the MLP output is normalised
        with pytest.raises(UnsupportedModelError, match="edit a single layer"):
            editor.apply(FACTS, hparams=tiny_hparams(editor, "memit", corpus_file))
        assert same_weights(loaded.model, saved)
        first = editor.apply(FACTS, hparams=tiny_hparams(editor, "memit", corpus_file, layers=(2,)))
        assert first.layers == [2]
    else:
        first = editor.apply(FACTS, hparams=tiny_hparams(editor, "memit", corpus_file))
        assert first.layers == [1, 2]
    assert all(n > 0 for n in first.norms.values())
    editor.apply([FACT], hparams=tiny_hparams(editor, "rome", corpus_file))  # sequential
    assert len(editor.history) == 2
    editor.reset()
    assert same_weights(loaded.model, saved) and not editor.history


def test_sequential_undo_steps_back_one_edit_at_a_time(device, tokenizers, isolated_cache, corpus_file):
    loaded = tiny("llama", tokenizers, device)
    editor = Editor(loaded)
    states = [weights_of(loaded.model)]
    for fact in FACTS:
        editor.apply([fact], hparams=tiny_hparams(editor, "rome", corpus_file))
        states.append(weights_of(loaded.model))
    for expected in reversed(states[:-1]):
        editor.undo()
        assert same_weights(loaded.model, expected)


def test_gpt2_conv1d_layout_comes_from_the_module_class(tokenizers):
    adapter = tiny("gpt2", tokenizers).adapter
    assert adapter.transposed(0)
    d, d_k = adapter.matrix(0).shape
    assert (d, d_k) == (32, 128)  # (d, d_k) although Conv1D stores (d_k, d)
    assert not tiny("llama", tokenizers).adapter.transposed(0)


def test_export_and_load_from_local_directory(device, tokenizers, isolated_cache, corpus_file, tmp_path):
    loaded = tiny("qwen2", tokenizers, device)
    editor = Editor(loaded)
    editor.apply([FACT], hparams=tiny_hparams(editor, "rome", corpus_file))
    path = editor.save_pretrained(tmp_path / "edited")
    reloaded = load_model(str(path), device=device)
    assert reloaded.name == str(path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reloaded.model.state_dict()[key]), key
    ids = loaded.tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")["input_ids"].to(device)
    assert torch.equal(loaded.model(ids).logits, reloaded.model(ids).logits)


def test_unknown_family_names_what_is_supported(tokenizers):
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32,
                                           num_attention_heads=2, vocab_size=300, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match=r"'opt' is not supported; supported: .*llama"):
        ModelAdapter(model)


def test_original_rome_enforces_the_plain_prompt_key(device, tokenizers, isolated_cache, corpus_file):
    """rome_variant=original: Ŵ k_p = v* for the plain-prompt key, not for the mean key."""
    from emmet_core.keys import compute_keys
    from emmet_core.templates import context_templates

    loaded = tiny("llama", tokenizers, device)
    editor = Editor(loaded)
    hp = tiny_hparams(editor, "rome", corpus_file, rome_variant="original")
    templates = context_templates(loaded, [list(x) for x in hp.context_templates], seed=hp.seed)
    request = editor.prepare([FACT])
    mean_key, plain_key = compute_keys(loaded, request, templates, 2, mode="mean")
    before_plain = loaded.adapter.project(2, plain_key)
    before_mean = loaded.adapter.project(2, mean_key)
    (update,) = editor.apply([FACT], hparams=hp).updates
    moved_plain = loaded.adapter.project(2, plain_key) - before_plain
    moved_mean = loaded.adapter.project(2, mean_key) - before_mean
    target = update.residuals.to(moved_plain)
    assert (moved_plain - target).norm() / target.norm() < 1e-4
    assert (moved_mean - target).norm() / target.norm() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", ["alphaedit", "encore"])
def test_lifelong_editors_edit_in_sequence_and_undo_exactly(family, algorithm, device, tokenizers, isolated_cache,
                                                             corpus_file):
    """AlphaEdit keeps the keys of earlier edits (from the Editor's history) and ENCORE the
    distance from W₀ (from the ledger); both edit, in sequence, and undo bit for bit."""
    loaded = tiny(family, tokenizers, device)
    editor = Editor(loaded)
    saved = weights_of(loaded.model)
    layers = (2,) if loaded.adapter.spec.post_mlp_norm else (1, 2)
    # A threshold above most of a tiny C0's spectrum: the null space is most of the space.
    hp = tiny_hparams(editor, algorithm, corpus_file, layers=layers, nullspace_threshold=1e6)
    first = editor.apply(FACTS[:2], hparams=hp, refuse_current=False)
    second = editor.apply(FACTS[2:], hparams=hp, refuse_current=False)
    assert all(n > 0 for n in first.norms.values()) and all(n > 0 for n in second.norms.values())
    if algorithm == "encore":  # the second solve saw the drift the first one made
        assert editor.ledger.drift(2) is not None
    editor.undo()
    editor.undo()
    assert same_weights(loaded.model, saved)
