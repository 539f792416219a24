"""Bad input gets a clear error, and the weights stay bit-for-bit as they were."""

from __future__ import annotations

import pytest
import torch
from conftest import same_weights, tiny, tiny_hparams, weights_of

from emmet_core import Editor, load_model
from emmet_core.errors import EditError, InvalidRequestError, NumericalError, UnsupportedModelError

FACT = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": "English", "target_true": "French"}


@pytest.fixture
def setup(tokenizers, isolated_cache, corpus_file):
    loaded = tiny("llama", tokenizers)
    return loaded, Editor(loaded), weights_of(loaded.model), corpus_file


CASES = {
    "empty subject": ({**FACT, "subject": "  "}, "subject is empty"),
    "subject not in prompt": ({**FACT, "prompt": "The mother tongue of Michel Rocard is"}, "does not occur"),
    "empty target": ({**FACT, "target_new": ""}, "target_new is empty"),
    "target equals old object": ({**FACT, "target_new": "French"}, "equals target_true"),
    "two subject slots": ({**FACT, "prompt": "{} and {} speak"}, "exactly one"),
    "prompt too long": ({**FACT, "prompt": "Paris is in France. " * 60 + "The mother tongue of {} is"},
                        "context of 128"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_changes_nothing(case, setup):
    loaded, editor, saved, corpus = setup
    request, message = CASES[case]
    with pytest.raises(InvalidRequestError, match=message):
        editor.apply([request], hparams=tiny_hparams(editor, "rome", corpus))
    assert same_weights(loaded.model, saved) and not editor.history


def test_a_prompt_beyond_learned_positions_is_refused_before_the_model_reads_it(tokenizers, isolated_cache,
                                                                               corpus_file):
    """GPT-2 has no positions past its context: reading the model's answer to the prompt
    (no old object given) would fail inside the model, so the length is checked first."""
    loaded = tiny("gpt2", tokenizers)
    editor, saved = Editor(loaded), weights_of(loaded.model)
    request = {"prompt": "Paris is in France. " * 60 + "{} speaks", "subject": "Danielle Darrieux",
               "target_new": "English"}
    with pytest.raises(InvalidRequestError, match="more than the model's context of 128"):
        editor.apply([request], hparams=tiny_hparams(editor, "rome", corpus_file))
    assert same_weights(loaded.model, saved) and not editor.history


def test_the_subject_matches_whole_words_only():
    from emmet_core.request import EditRequest

    request = EditRequest("Paris is the capital of", "is", "was")
    assert request.prompt == "Paris {} the capital of"  # the word, not the "is" inside "Paris"
    with pytest.raises(InvalidRequestError, match="only inside a longer word"):
        EditRequest("Paris is the capital of", "Par", "Rome")


@pytest.mark.parametrize("item, message", [
    ({"prompt": "{} is", "subj": "Berlin", "target_new": "Rome"}, "unknown key"),
    ({"prompt": "{} is", "subject": "Berlin", "target_new": ["Rome"]}, "must be text"),
    ("Berlin is Rome", "must be an object"),
])
def test_requests_from_mappings_name_what_is_wrong(item, message, setup):
    loaded, editor, saved, corpus = setup
    with pytest.raises(InvalidRequestError, match=message):
        editor.apply([item], hparams=tiny_hparams(editor, "emmet", corpus))
    assert same_weights(loaded.model, saved)


def test_facts_that_share_a_key_with_different_objects_are_refused(setup):
    """'Berlin is the capital of' and 'Berlin is in' read the same key (the text up to the
    subject's last token is the same); EMMET would drop one of them silently."""
    loaded, editor, saved, corpus = setup
    batch = [{"prompt": "{} is the capital of", "subject": "Berlin", "target_new": "Italy"},
             {"prompt": "{} is in", "subject": "Berlin", "target_new": "Spain"}]
    with pytest.raises(InvalidRequestError, match="same key"):
        editor.apply(batch, hparams=tiny_hparams(editor, "emmet", corpus, mom2_update_weight=0.0))
    assert same_weights(loaded.model, saved)
    both = [batch[0], {**batch[1], "target_new": "Italy"}]  # the same object twice is fine
    editor.apply(both, hparams=tiny_hparams(editor, "emmet", corpus), refuse_current=False)


def test_conflicting_edits_in_one_batch(setup):
    loaded, editor, saved, corpus = setup
    batch = [FACT, {**FACT, "target_new": "German"}]
    with pytest.raises(InvalidRequestError, match="conflicting edits"):
        editor.apply(batch, hparams=tiny_hparams(editor, "emmet", corpus))
    assert same_weights(loaded.model, saved)


@pytest.mark.parametrize("change, error, message", [
    ({"algorithm": "rmoe"}, InvalidRequestError, "unknown algorithm"),
    ({"layers": (9,)}, UnsupportedModelError, r"layers 0\.\.3"),
    ({"layers": (1, 2)}, InvalidRequestError, "exactly one layer"),
    ({"rome_variant": "new"}, InvalidRequestError, "rome_variant"),
    ({"v_lr": "abc"}, InvalidRequestError, "v_lr must be a number > 0, not 'abc'"),
    ({"stats_tokens": -5}, InvalidRequestError, "stats_tokens must be a whole number ≥ 1"),
    ({"layers": "4"}, InvalidRequestError, "layers must be a list of layer numbers"),
])
def test_bad_hyper_parameters(change, error, message, setup):
    loaded, editor, saved, corpus = setup
    with pytest.raises(error, match=message):
        editor.apply([FACT], hparams=tiny_hparams(editor, "rome", corpus).replace(**change))
    assert same_weights(loaded.model, saved)


def test_unknown_hyper_parameter_name(setup):
    _, editor, _, corpus = setup
    with pytest.raises(InvalidRequestError, match="unknown hyper-parameter"):
        tiny_hparams(editor, "rome", corpus).replace(learning_rate=1.0)


def test_singular_covariance(setup):
    """Far fewer covariance tokens than key dimensions: C0 is singular."""
    loaded, editor, saved, corpus = setup
    with pytest.raises(NumericalError, match="singular"):
        editor.apply([FACT], hparams=tiny_hparams(editor, "rome", corpus).replace(stats_tokens=16))
    assert same_weights(loaded.model, saved)


def test_nan_activations(setup):
    loaded, editor, _, corpus = setup
    with torch.no_grad():
        loaded.adapter.layer(0).mlp.up_proj.weight[0, 0] = float("nan")
    poisoned = weights_of(loaded.model)
    with pytest.raises(NumericalError, match="NaN"):
        editor.apply([FACT], hparams=tiny_hparams(editor, "emmet", corpus).replace(stats_tokens=3001))
    assert same_weights(loaded.model, poisoned)


def test_failure_after_first_layer_restores_everything(setup):
    """MEMIT writes layer 1 before solving layer 2; an error then must undo layer 1."""
    loaded, editor, saved, corpus = setup
    seen = []

    def fail_on_second_layer(phase: str) -> None:
        seen.append(phase)
        if seen.count("keys") == 2:
            raise RuntimeError("interrupted")

    editor.on_phase = fail_on_second_layer
    with pytest.raises(RuntimeError, match="interrupted"):
        editor.apply([FACT], hparams=tiny_hparams(editor, "memit", corpus))
    assert seen.count("solve") == 1  # layer 1 had been written
    assert same_weights(loaded.model, saved) and not editor.history


def test_unknown_model_and_undo_without_history(setup, monkeypatch):
    _, editor, _, _ = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnsupportedModelError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(EditError, match="nothing to undo"):
        editor.undo()
