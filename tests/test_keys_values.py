"""Subject location, target tokenisation, and the value optimisation's shortcuts
(prefix KV cache, replayed lower layers) checked against plain full forward passes."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny

from emmet_core.errors import InvalidRequestError
from emmet_core.keys import compute_keys, subject_rows
from emmet_core.readout import score_targets
from emmet_core.request import EditRequest
from emmet_core.tokens import encode_with_subject, target_ids
from emmet_core.values import ValueConfig, _bf16_matrices, compute_values


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("prompt", ["{} is a native speaker of", "The mother tongue of {} is",
                                    "Where {} is from, people speak", "Everyone knows the city of {}"])
def test_subject_last_token_found_anywhere(kind, prompt, tokenizers):
    tok = tokenizers[kind]
    request = EditRequest(prompt, "Danielle Darrieux", "English")
    ids, last = encode_with_subject(tok, request.text, request.subject_span)
    upto = tok.decode(ids[: last + 1], skip_special_tokens=True)
    assert upto.rstrip().endswith("Darrieux"), upto
    assert "Darrieux" not in tok.decode(ids[:last], skip_special_tokens=True)


def test_target_tokens_have_no_lone_sentencepiece_space(tokenizers):
    for kind in ("bpe", "sp"):
        ids = target_ids(tokenizers[kind], "English")
        assert tokenizers[kind].decode(ids).strip() == "English"
        assert tokenizers[kind].decode(ids[:1]).strip() != ""


def test_prompt_containing_subject_becomes_template():
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " English ")
    assert request.prompt == "The mother tongue of {} is" and request.target_new == "English"
    assert request.text[slice(*request.subject_span)] == "Danielle Darrieux"


@pytest.mark.parametrize("family", FAMILIES)
def test_value_loss_matches_full_forward(family, tokenizers):
    """At δ = 0 the optimisation's target NLL (computed from a prefix cache and only the
    suffix tokens) equals the NLL of a plain forward pass over the whole prompts."""
    loaded = tiny(family, tokenizers)
    templates = ["{}", "Berlin is in Germany. {}", "Yes. {}"]
    requests = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
                EditRequest("{} is the capital of", "Berlin", "Italy", "Germany")]
    config = ValueConfig(steps=1)
    for site, layer in (("mlp", 2), ("residual", 1)):
        result = compute_values(loaded, requests, templates, layer, site, config)
        for i, request in enumerate(requests):
            texts = [t.replace("{}", request.text) for t in templates]
            expected = sum(s.mean_nll for s in score_targets(loaded, texts, [request.target_new] * 3)) / 3
            assert result.loss_before[i].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_optimisation_lowers_the_loss_and_respects_the_clamp(family, tokenizers):
    loaded = tiny(family, tokenizers)
    requests = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")]
    config = ValueConfig(steps=15, lr=0.5, clamp=0.75, kl_factor=0.0)
    result = compute_values(loaded, requests, ["{}"], 2, "residual", config)
    assert result.nll_after[0] < result.loss_before[0] - 0.1
    delta_norm = (result.values - result.v_init).norm(dim=1)
    assert delta_norm[0] <= 0.75 * result.v_init.norm(dim=1)[0] * (1 + 1e-5)


def test_keys_are_averaged_over_templates(tokenizers):
    loaded = tiny("llama", tokenizers)
    requests = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")]
    templates = ["{}", "Yes. {}", "Berlin is in Germany. {}"]
    mean, plain = compute_keys(loaded, requests, templates, 1, mode="mean")
    half, plain2 = compute_keys(loaded, requests, templates, 1, mode="half")
    singles = torch.cat([compute_keys(loaded, requests, [t], 1)[0] for t in templates], dim=1)
    assert torch.allclose(plain, plain2) and torch.allclose(plain[:, 0], singles[:, 0], atol=1e-5)
    assert torch.allclose(mean[:, 0], singles.mean(1), atol=1e-5)
    assert torch.allclose(half[:, 0], 0.5 * singles[:, 0] + 0.25 * (singles[:, 1] + singles[:, 2]), atol=1e-5)


def test_overlong_prompt_is_refused(tokenizers):
    loaded = tiny("gpt2", tokenizers)  # context of 128 tokens
    long_prompt = "Paris is the capital of France. " * 40 + "The mother tongue of {} is"
    requests = [EditRequest(long_prompt, "Danielle Darrieux", "English")]
    with pytest.raises(InvalidRequestError, match="context of 128"):
        subject_rows(loaded, requests, ["{}"])


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_matrices_compute_what_autocast_computes(family, tokenizers):
    """The bfloat16 stand-ins used during the value steps give bit-identical outputs to
    autocast's own per-use casts, and the original float32 parameters come back."""
    loaded = tiny(family, tokenizers)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    originals = dict(loaded.model.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = loaded.model(ids).logits
        with _bf16_matrices([*loaded.adapter.layers, loaded.adapter.unembed]):
            assert loaded.adapter.matrix(1).dtype == torch.bfloat16
            swapped = loaded.model(ids).logits
    assert torch.equal(reference, swapped)
    restored = dict(loaded.model.named_parameters())
    assert restored.keys() == originals.keys()
    assert all(restored[name] is param and param.dtype == torch.float32 for name, param in originals.items())


def test_tied_unembedding_gets_its_own_bfloat16_copy(smollm):
    head, embedding = smollm.adapter.unembed, smollm.model.get_input_embeddings()
    assert head.weight is embedding.weight  # SmolLM2 ties them
    with _bf16_matrices([head]):
        assert head.weight.dtype == torch.bfloat16 and embedding.weight.dtype == torch.float32
    assert head.weight is embedding.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_scores_match_one_forward_per_pair(family, tokenizers):
    """score_targets runs each distinct prompt once and continues its KV cache for every
    target; the log-probabilities and hits must equal a full forward of prompt + target."""
    loaded = tiny(family, tokenizers)
    tok = loaded.tokenizer
    prompts = ["The mother tongue of Danielle Darrieux is", "Berlin is the capital of",
               "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the guitar and",
               "Berlin is the capital of"]
    targets = ["French", "the capital of Italy", "English and German too", "Paris", "Rome"]
    scores = score_targets(loaded, prompts, targets, batch_size=2)
    for prompt, target, score in zip(prompts, targets, scores):
        p_ids, t_ids = tok(prompt)["input_ids"], target_ids(tok, target)
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].float()
        logp = logits[len(p_ids) - 1 : -1].log_softmax(-1)
        wanted = torch.tensor(t_ids)
        assert score.n_tokens == len(t_ids)
        assert score.logprob == pytest.approx(float(logp.gather(1, wanted[:, None]).sum()), abs=1e-4)
        assert score.hits == int((logp.argmax(-1) == wanted).sum())
