"""What makes benchmark runs cheap must not change their results: the disk cache of
value targets, its batched warm-up, bfloat16 value optimisation, and per-prompt seeded
sampling for generation entropy."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny, tiny_hparams

from emmet_core.cli import parse_sets
from emmet_core.editor import Editor
from emmet_core.errors import EditError, InvalidRequestError
from emmet_core.readout import generate
from emmet_core.request import EditRequest
from emmet_core.value_cache import cached_values
from emmet_core.values import ValueConfig, compute_values

FACTS = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
         EditRequest("{} is the capital of", "Berlin", "Italy", "Germany"),
         EditRequest("{} plays the", "Miles Davis", "violin", "trumpet")]
TEMPLATES = ["{}", "Yes. {}"]


def test_cached_values_equal_fresh_ones_and_skip_the_work(tokenizers, isolated_cache):
    loaded = tiny("llama", tokenizers)
    config = ValueConfig(steps=6)
    fresh = compute_values(loaded, FACTS, TEMPLATES, 1, "residual", config)
    first = cached_values(loaded, FACTS[:2], TEMPLATES, 1, "residual", config)
    assert first.steps > 0
    files = sorted((isolated_cache / "values").rglob("*.safetensors"))
    assert len(files) == 2
    heard: list[int] = []
    mixed = cached_values(loaded, FACTS, TEMPLATES, 1, "residual", config, progress=heard.append)  # 2 cached, 1 new
    assert heard == [2, 1]  # the cached facts at once, then the optimised one
    assert len(sorted((isolated_cache / "values").rglob("*.safetensors"))) == 3
    again = cached_values(loaded, FACTS[::-1], TEMPLATES, 1, "residual", config)
    assert again.steps == 0  # nothing optimised
    assert torch.allclose(mixed.values, fresh.values, atol=1e-4)
    assert torch.equal(again.values, mixed.values.flip(0))
    assert torch.equal(again.loss_before, mixed.loss_before.flip(0))


def test_value_groups_report_progress_and_do_not_change_the_result(tokenizers):
    """Facts are optimised in groups of about ``rows_per_pass`` prompt rows; each fact has
    its own loss, so groups of one fact give the same v* as one group of all."""
    loaded = tiny("qwen2", tokenizers)
    together = compute_values(loaded, FACTS, TEMPLATES, 1, "residual", ValueConfig(steps=5))
    heard: list[int] = []
    apart = compute_values(loaded, FACTS, TEMPLATES, 1, "residual", ValueConfig(steps=5, rows_per_pass=3),
                           progress=heard.append)
    assert heard == [1, 1, 1]  # 3 rows per fact (two templates and the KL prompt): one fact per group
    assert torch.allclose(apart.values, together.values, atol=1e-4)
    assert torch.allclose(apart.loss_before, together.loss_before, atol=1e-5)


def test_cache_keys_on_config_and_survives_a_torn_file(tokenizers, isolated_cache):
    loaded = tiny("gpt2", tokenizers)
    cached_values(loaded, FACTS[:1], TEMPLATES, 1, "residual", ValueConfig(steps=3))
    cached_values(loaded, FACTS[:1], TEMPLATES, 1, "residual", ValueConfig(steps=4))
    cached_values(loaded, FACTS[:1], TEMPLATES, 1, "mlp", ValueConfig(steps=3))
    files = sorted((isolated_cache / "values").rglob("*.safetensors"))
    assert len({f.parent for f in files}) == 3
    files[0].write_bytes(b"not a safetensors file")
    redo = cached_values(loaded, FACTS[:1], TEMPLATES, 1, "residual", ValueConfig(steps=3))
    assert torch.isfinite(redo.values).all()


def test_editor_uses_the_cache_only_on_unedited_weights(tokenizers, isolated_cache, corpus_file):
    loaded = tiny("llama", tokenizers)
    editor = Editor(loaded)
    hp = tiny_hparams(editor, "emmet", corpus_file)
    plain = editor.apply(FACTS[:2], hparams=hp, refuse_current=False)
    editor.reset()
    editor.warm_values(FACTS, hp)
    assert len(list((isolated_cache / "values").rglob("*.safetensors"))) == 3
    cached = editor.apply(FACTS[:2], hparams=hp, refuse_current=False, cache_values=True)
    assert torch.allclose(cached.updates[0].delta, plain.updates[0].delta, atol=1e-4, rtol=1e-3)
    with pytest.raises(InvalidRequestError, match="unedited"):
        editor.warm_values(FACTS, hp)
    # On edited weights the cache is bypassed: nothing new is written for this fact.
    before = len(list((isolated_cache / "values").rglob("*.safetensors")))
    editor.apply([EditRequest("{} works in", "Ada Lovelace", "Paris", "London")], hparams=hp,
                 refuse_current=False, cache_values=True)
    assert len(list((isolated_cache / "values").rglob("*.safetensors"))) == before


def test_bfloat16_values_reach_the_target_like_float32(tokenizers):
    loaded = tiny("qwen2", tokenizers)
    results = {p: compute_values(loaded, FACTS, TEMPLATES, 1, "residual",
                                 ValueConfig(steps=12, kl_factor=0.0, precision=p)) for p in ("float32", "bfloat16")}
    for result in results.values():
        assert (result.nll_after < result.loss_before - 0.1).all()
        assert result.values.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(results["float32"].values, results["bfloat16"].values)
    assert (cos > 0.95).all()


def test_attention_kernel_is_restored_after_bfloat16(tokenizers):
    loaded = tiny("llama", tokenizers)
    before = loaded.model.config._attn_implementation
    compute_values(loaded, FACTS[:1], TEMPLATES, 1, "residual", ValueConfig(steps=2, precision="bfloat16"))
    assert loaded.model.config._attn_implementation == before
    with pytest.raises(ValueError, match="precision"):
        compute_values(loaded, FACTS[:1], TEMPLATES, 1, "residual", ValueConfig(steps=2, precision="int8"))


def test_sampled_text_depends_on_prompt_and_seed_not_on_the_batch(tokenizers):
    loaded = tiny("gpt2", tokenizers)
    prompts = ["The mother tongue of Danielle Darrieux is", "Berlin is the capital of", "Miles Davis plays"]
    alone = generate(loaded, prompts[1:2], 12, top_k=5, seed=3)
    batched = generate(loaded, prompts, 12, batch_size=3, top_k=5, seed=3)
    assert alone[0] == batched[1]
    assert generate(loaded, prompts, 12, top_k=5, seed=4) != batched
    assert generate(loaded, prompts, 12, top_k=5, seed=3) == batched


def test_the_sampler_draws_exactly_from_softmax_over_the_top_k():
    """Gumbel noise on the top k logits, drawn up front per prompt: the token kept is a
    sample of softmax(top k), and nothing outside the top k is ever kept."""
    from emmet_core.readout import _RowSeededTopK

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0, -9.0]])
    rows = 6000
    sampler = _RowSeededTopK([f"prompt {i}" for i in range(rows)], top_k=3, seed=0, steps=1)
    kept = sampler(torch.zeros(rows, 4, dtype=torch.long), logits.repeat(rows, 1))
    chosen = kept.argmax(-1)
    assert torch.isinf(kept).sum(-1).eq(5).all()  # one finite entry per row
    counts = torch.bincount(chosen, minlength=6).double() / rows
    expected = torch.zeros(6, dtype=torch.float64)
    expected[[4, 0, 1]] = torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64).softmax(0)
    assert counts[[2, 3, 5]].sum() == 0
    assert torch.allclose(counts, expected, atol=0.02)


def test_set_overrides_parse_yaml_values():
    assert parse_sets(["kl_factor=0.1", "layers=[3, 4]", "value_precision=bfloat16"]) == {
        "kl_factor": 0.1, "layers": [3, 4], "value_precision": "bfloat16"}
    with pytest.raises(EditError, match="KEY=VALUE"):
        parse_sets(["kl_factor"])


def test_editor_covariance_is_the_cached_c0(tokenizers, isolated_cache, corpus_file):
    loaded = tiny("gpt2", tokenizers)
    editor = Editor(loaded)
    hp = tiny_hparams(editor, "memit", corpus_file)
    cov = editor.covariance(1, hp)
    assert cov.shape == (loaded.adapter.key_size(1),) * 2
    assert torch.allclose(cov, cov.T) and torch.linalg.eigvalsh(cov.double()).min() > -1e-6
    assert editor.covariance(1, hp) is cov  # computed once per editor
    with pytest.raises(EditError, match="out of range"):
        editor.covariance(99, hp)


@pytest.mark.parametrize("family, site, layer", [("qwen2", "residual", 1), ("gpt2", "mlp", 0)])
def test_a_pass_drops_the_rows_of_stopped_facts_without_changing_any_result(tokenizers, family, site, layer):
    """Early stop ends facts at different steps (here: a loss the random model's facts
    reach one after another); once half have stopped the pass goes on with the others'
    rows only (prefix cache, replayed lower layers and KL reference cut to match). Every
    fact's v* and losses equal those of its own pass."""
    loaded = tiny(family, tokenizers)
    facts = [*FACTS, EditRequest("{} works as a", "Danielle Darrieux", "banker", "actress"),
             EditRequest("{} is located in", "Berlin", "Asia", "Europe"),
             EditRequest("{} was born in", "Miles Davis", "Tokyo", "Alton")]
    config = ValueConfig(steps=20, lr=0.5, clamp=100.0, weight_decay=0.0, stop_loss=5.6)
    counts: list[int] = []
    together = compute_values(loaded, facts, TEMPLATES, layer, site, config,
                              on_step=lambda step, steps, optimising: counts.append(optimising))
    assert any(2 * k <= len(facts) for k in counts[:-1]) and counts[-1] < counts[0]  # the pass shrank, went on
    alone = [compute_values(loaded, [fact], TEMPLATES, layer, site, config) for fact in facts]
    for name in ("values", "nll_after", "loss_after", "loss_before"):
        assert torch.allclose(getattr(together, name), torch.cat([getattr(a, name) for a in alone]), atol=1e-4), name
    assert together.steps == max(a.steps for a in alone)
