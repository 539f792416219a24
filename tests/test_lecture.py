"""Lecture mode and the "Ask the model" box (issue 13): the top next tokens, prepared v* of
the examples and whether an edit used them, figures for a projector, and the one rule for
numbers on every page. Tiny random models on the CPU, no mocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, tiny

from emmet_core.errors import InvalidRequestError
from emmet_core.models import prepare
from emmet_core.readout import top_next_tokens, top_next_tokens_batch
from emmet_core.request import EditRequest
from emmet_core.studio import figures
from emmet_core.studio.ask import MAX_PROMPT_CHARS, ask, check_prompt
from emmet_core.studio.display import format_value
from emmet_core.studio.lecture import example_requests, prepare_examples, value_cache_note
from emmet_core.studio.workflows import PromptScore
from emmet_core.studio.workspace import Session, SharedModel

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples.json"
DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
TOKO = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")
PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"]


@pytest.fixture
def shared(isolated_cache, corpus_file):
    tokenizer = make_tokenizer("bpe")
    shared = SharedModel(prepare(make_model("llama", len(tokenizer)), tokenizer, "tiny-llama", "cpu"))
    shared.corpus = corpus_file
    return shared


def small(shared: SharedModel, algorithm: str):
    return shared.editor.hparams(algorithm, layers=(2,), v_num_grad_steps=8, context_templates=((3, 2),),
                                 stats_corpus=str(shared.corpus), stats_tokens=3000)


# -- the top next tokens -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])  # byte-level BPE; SentencePiece with a BOS token
def test_top_next_tokens_match_a_direct_softmax(tokenizers, family, device):
    loaded = tiny(family, tokenizers, device)  # tensors are made where the model is (CUDA too, where there is one)
    batch = top_next_tokens_batch(loaded, PROMPTS, k=5)
    assert len(batch) == 2
    for prompt, tops in zip(PROMPTS, batch):
        ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            probs = loaded.model(ids).logits[0, -1].float().softmax(-1).cpu()
        expected = probs.topk(5)
        assert [t for t, _ in tops] == [loaded.tokenizer.decode([i]) for i in expected.indices.tolist()]
        tolerance = 1e-5 if device == "cpu" else 1e-4
        assert torch.allclose(torch.tensor([p for _, p in tops]), expected.values, atol=tolerance)
        ps = [p for _, p in tops]
        assert ps == sorted(ps, reverse=True) and 0 < sum(ps) <= 1 + 1e-6
        alone = top_next_tokens(loaded, prompt, k=5)  # padding in a batch changes nothing
        assert [t for t, _ in alone] == [t for t, _ in tops]
        assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), (_, b) in zip(alone, tops))


def test_top_next_tokens_refuse_what_they_cannot_read(tokenizers):
    loaded = tiny("gpt2", tokenizers)  # no BOS token: an empty prompt is no tokens at all
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        top_next_tokens(loaded, "   ")
    with pytest.raises(InvalidRequestError, match="more than the model's context of 128"):
        top_next_tokens(loaded, "Paris is a city. " * 60)
    with pytest.raises(InvalidRequestError, match="k must be"):
        top_next_tokens(loaded, "Paris", k=0)


def test_a_prompt_is_capped_without_echoing_it():
    assert check_prompt("  The capital of France is ") == "The capital of France is"
    with pytest.raises(InvalidRequestError, match="type a prompt"):
        check_prompt(" \n ")
    long = "secret " * 60
    with pytest.raises(InvalidRequestError) as error:
        check_prompt(long)
    message = str(error.value)
    assert f"{len(long.strip())} characters" in message and f"at most {MAX_PROMPT_CHARS}" in message
    assert "secret" not in message


def test_ask_reads_the_original_and_the_sessions_model(shared):
    session = Session(shared)
    before = ask(session, PROMPTS[0])
    assert before.original == before.edited and before.edits == 0
    session.edit([DARRIEUX], "rome", hparams=small(shared, "rome"))
    after = ask(session, PROMPTS[0])
    assert after.original == before.original  # the original weights, whatever the session holds
    assert after.edited != after.original and after.edits == 1
    assert Session(shared).run(lambda loaded: top_next_tokens(loaded, PROMPTS[0])) == before.original


# -- prepared v* and whether an edit used it ---------------------------------------------------
def test_a_second_edit_of_a_fact_reads_its_cached_value_and_gives_the_same_delta(shared, isolated_cache):
    session = Session(shared)
    hp = small(shared, "rome")
    first = session.edit([DARRIEUX], "rome", hparams=hp, cache_values=True).record
    assert first.results[0].value_cache == "original" and first.values_cached == 0  # a miss: optimised now
    assert value_cache_note(first).startswith("v* computed fresh: not prepared")
    session.undo()
    second = session.edit([DARRIEUX], "rome", hparams=hp, cache_values=True).record
    assert second.values_cached == 1 and value_cache_note(second).startswith("v* from cache (prepared)")
    (a,), (b,) = first.deltas, second.deltas
    assert torch.equal(a.change.view(torch.uint8), b.change.view(torch.uint8))  # bit for bit
    assert second.to_dict()["values_cached"] == 1
    # The session now holds an edit: the cache (v* of the original weights) is not used.
    files = sorted((isolated_cache / "values").rglob("*.safetensors"))
    third = session.edit([TOKO], "rome", hparams=hp, cache_values=True).record
    assert third.results[0].value_cache == "edited" and third.values_cached == 0
    assert "already holds edits" in value_cache_note(third)
    assert sorted((isolated_cache / "values").rglob("*.safetensors")) == files
    plain = session.edit([EditRequest("{} works in", "Ada Lovelace", "Paris", "London")], "rome", hparams=hp).record
    assert plain.results[0].value_cache == "off" and value_cache_note(plain) is None


def test_prepared_examples_make_their_edits_read_the_cache(shared, isolated_cache):
    examples = json.loads(EXAMPLES.read_text(encoding="utf-8"))
    requests = example_requests(examples)
    assert [r.subject for r in requests] == [e["subject"] for e in examples]
    hp = small(shared, "emmet")
    heard: list[int] = []
    prepared = prepare_examples(shared, requests, "emmet", hparams=hp, progress=heard.append)
    assert (prepared.algorithm, prepared.facts) == ("emmet", len(examples)) and sum(heard) == len(examples)
    assert len(list((isolated_cache / "values").rglob("*.safetensors"))) == len(examples)
    assert shared.ledger.is_original  # preparing leaves the shared weights as they were
    session = Session(shared)
    record = session.edit([requests[1]], "emmet", hparams=hp, cache_values=True, refuse_current=False).record
    assert record.values_cached == 1
    batch = Session(shared).edit(requests[:3], "emmet", hparams=hp, cache_values=True, refuse_current=False).record
    assert batch.values_cached == 3 and "v* from cache (prepared)" in value_cache_note(batch)


# -- a projector and numbers ---------------------------------------------------------------
def probe(p_new: float, p_true: float) -> PromptScore:
    return PromptScore("The mother tongue of Danielle Darrieux is", "English", "French", p_new, p_true,
                       -math.log(p_new), -math.log(p_true))


def test_figures_for_a_projector_have_larger_fonts_and_the_same_data():
    paraphrases = figures.paraphrase_chart([probe(0.1, 0.5)], [probe(0.9, 2.4e-6)])
    big = figures.scale_for_projector(paraphrases, 1.5)
    assert big.layout.font.size == 18 and big.layout.title.font.size == 22.5  # 12 (plotly's default), 15
    assert [a.font.size for a in big.layout.annotations] == [18]  # the prompt above its panel
    assert big.layout.height == round(paraphrases.layout.height * 1.5) and big.layout.margin.t == 126
    assert [t.x for t in big.data] == [t.x for t in paraphrases.data]
    assert paraphrases.layout.font.size is None and paraphrases.layout.title.font.size == 15  # not changed
    heat = figures.scale_for_projector(figures.batch_success_chart(["a"], [{"ES": 0.0}], [{"ES": 1.0}]), 2)
    assert heat.layout.yaxis.tickfont.size == 22 and [list(row) for row in heat.data[0].z] == [[1.0]]


def test_one_rule_for_numbers_everywhere():
    assert format_value(None) == format_value(float("nan"), "score") == "–"
    assert format_value(2.4e-06) == "2.4e-06"  # never "0%"
    assert (format_value(0.0024), format_value(0.001), format_value(0.00099)) == ("0.2%", "0.1%", "9.9e-04")
    assert format_value(2 / 3, "share") == "67%" and format_value(85.25, "score") == "85.2"
    assert format_value(2.3456, "bits") == "2.35 bits" and format_value(1234.5, "norm") == "1.23e+03"
    with pytest.raises(ValueError, match="unknown kind"):
        format_value(1.0, "furlongs")
    chart = figures.prompt_chart(probe(2.4e-6, 0.5), probe(0.9, 0.0024))
    assert list(chart.data[0].text) == ["2.4e-06", "90.0%"] and list(chart.data[1].text) == ["50.0%", "0.2%"]
