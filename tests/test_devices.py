"""Device discipline, checked without a GPU, and device maps through accelerate.

With ``torch.set_default_device("meta")`` every tensor made without an explicit device
lands on 'meta' instead of beside the CPU inputs, and the first operation that combines
it with them fails, just as a tensor made on the CPU fails beside CUDA inputs. So the
pure functions and the whole edit pipeline run under it here: a forgotten ``device=`` is
caught on a CPU-only machine (EMMET's ridge identity was one, and crashed every CUDA run).

Device maps: a tiny model saved to disk and loaded back by ``load_model(device_map=...)``
with some layers offloaded to disk (accelerate loads them for each forward) edits, undoes
and evaluates exactly as the same model loaded plainly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, FAMILIES, make_model, make_tokenizer, tiny, tiny_hparams

from emmet_core import Editor, load_model
from emmet_core.data import EvalRecord
from emmet_core.errors import UnsupportedModelError
from emmet_core.evaluate import score_records
from emmet_core.models import resolve_device
from emmet_core.readout import generate, score_targets
from emmet_core.request import EditRequest
from emmet_core.solvers import (
    alphaedit_update,
    emmet_update,
    encore_update,
    memit_update,
    null_space_projector,
    rome_update,
    solve_spd,
)
from emmet_core.stats import compute_covariances
from emmet_core.studio.anatomy import picture, spectrum
from emmet_core.templates import context_templates
from emmet_core.tokens import pad_rows

FACTS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
          "target_new": "English", "target_true": "French"},
         {"prompt": "{} is the capital of", "subject": "Berlin", "target_new": "Italy", "target_true": "Germany"}]


@pytest.fixture
def meta_default():
    """Tensors made without a device land on 'meta' for the length of the test."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def cpu_problem(d: int = 6, d_k: int = 9, n: int = 3):
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(50, d_k, generator=gen, dtype=torch.float64, device="cpu")
    cov = samples.T @ samples / 50
    keys = torch.randn(d_k, n, generator=gen, dtype=torch.float64, device="cpu")
    residuals = torch.randn(d, n, generator=gen, dtype=torch.float64, device="cpu")
    return residuals, keys, cov


def test_the_meta_default_catches_a_tensor_made_without_a_device(meta_default):
    """The check itself: the bug EMMET had (an identity made without a device) fails here."""
    _, keys, _ = cpu_problem()
    with pytest.raises(RuntimeError, match="meta"):
        _ = keys.T @ keys + torch.eye(keys.shape[1], dtype=keys.dtype)


def test_solvers_make_every_tensor_beside_their_inputs(meta_default):
    residuals, keys, cov = cpu_problem()
    projector = null_space_projector(cov, threshold=float(torch.linalg.eigvalsh(cov)[4]))
    drift = torch.ones(residuals.shape[0], cov.shape[0], dtype=torch.float64, device="cpu")
    for update in (emmet_update(residuals, keys, cov, ridge=0.1), emmet_update(residuals, keys, cov),
                   alphaedit_update(residuals, keys, projector, keys @ keys.T, 10.0),
                   encore_update(residuals, keys, cov, 2.0, 1.0, drift), projector,
                   memit_update(residuals, keys, cov, 2.0), rome_update(residuals[:, 0], keys[:, 0], cov),
                   rome_update(residuals[:, 0], keys[:, 0], cov, constraint_key=keys[:, 1]),
                   solve_spd(cov, keys, "C0")):
        assert update.device.type == "cpu" and torch.isfinite(update).all()


def test_pictures_and_padding_make_every_tensor_beside_their_inputs(meta_default):
    residuals, keys, cov = cpu_problem()
    shot = picture("x", 1, keys, residuals, emmet_update(residuals, keys, cov))
    assert shot.rank == 3 and shot.residual_after.device.type == "cpu"
    assert spectrum(cov).device.type == "cpu"
    ids, mask = pad_rows([[5, 6, 7], [8]], 0, torch.device("cpu"), left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# Gemma 3's sliding-window KV cache makes a tensor without a device inside transformers
# itself (cache_utils), so the whole pipeline cannot run under the meta default there.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3_text"])
def test_the_whole_pipeline_makes_every_tensor_beside_the_model(family, tokenizers, isolated_cache, corpus_file):
    loaded = tiny(family, tokenizers)
    editor = Editor(loaded)
    request = EditRequest(**FACTS[0])
    record = EvalRecord("0", request, ["Danielle Darrieux speaks"], ["Michel Rocard speaks"], ["French"],
                        ["Danielle Darrieux is"])
    settings = {algorithm: tiny_hparams(editor, algorithm, corpus_file, nullspace_threshold=1e6)
                for algorithm in ("rome", "memit", "emmet", "alphaedit", "encore")}
    torch.set_default_device("meta")
    try:
        covs, _ = compute_covariances(loaded, [1, 2], str(corpus_file), n_tokens=600, progress=False)
        templates = context_templates(loaded, [[3, 2]], seed=1, use_cache=False)
        for algorithm, hp in settings.items():
            result = editor.apply(FACTS[:1] if algorithm == "rome" else FACTS, hparams=hp)
            assert all(torch.isfinite(u.delta).all() for u in result.updates)
        scored = score_targets(loaded, [request.text], ["English"])
        texts = generate(loaded, [request.text], max_new_tokens=4, top_k=5, seed=3)
        rows = score_records(loaded, [record], gen_tokens=4)
        editor.reset()
    finally:
        torch.set_default_device(None)
    assert covs[1].device.type == "cpu" and len(templates) == 3
    assert scored[0].n_tokens >= 1 and isinstance(texts[0], str) and "ES" in rows[0]


def test_overlapping_tf32_blocks_put_the_switch_back_when_the_last_one_leaves():
    import threading

    from emmet_core.precision import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None) or matmul.allow_tf32
    inside, leave = threading.Event(), threading.Event()

    def other_user() -> None:
        with tf32_matmuls():
            inside.set()
            leave.wait(5)

    thread = threading.Thread(target=other_user)
    with tf32_matmuls():
        thread.start()
        inside.wait(5)
    assert (getattr(matmul, "fp32_precision", None) or matmul.allow_tf32) in ("tf32", True)  # the other still in
    leave.set()
    thread.join()
    assert (getattr(matmul, "fp32_precision", None) or matmul.allow_tf32) == before


# -- device maps (accelerate) ------------------------------------------------------------------
LLAMA_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
             "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    tokenizer = make_tokenizer("sp")
    path = tmp_path_factory.mktemp("llama")
    make_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def state(loaded) -> dict[str, torch.Tensor]:
    """The weights held in memory (offloaded ones are on 'meta' and not compared)."""
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items() if v.device.type != "meta"}


@pytest.mark.parametrize("algorithm", ["rome", "memit", "emmet"])
def test_a_model_with_offloaded_layers_edits_exactly_like_the_plain_one(algorithm, saved_llama, tmp_path,
                                                                          isolated_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    plain = load_model(str(saved_llama), device="cpu")
    mapped = load_model(str(saved_llama), device_map=LLAMA_MAP, offload_folder=tmp_path / "offload")
    assert mapped.placement() == "device map: cpu ×6, disk ×2"
    assert mapped.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    layers = (0, 2) if algorithm == "memit" else (2,)  # the offloaded layers 1 and 3 run, unedited
    facts = FACTS[:1] if algorithm == "rome" else FACTS
    results = []
    for loaded in (plain, mapped):
        editor = Editor(loaded)
        before = state(loaded)
        hp = tiny_hparams(editor, algorithm, corpus, layers=layers)
        results.append(editor.apply(facts, hparams=hp))
        after = score_targets(loaded, [EditRequest(**f).text for f in facts], [f["target_new"] for f in facts])
        results[-1].after = [s.logprob for s in after]
        editor.undo()
        now = state(loaded)
        assert all(torch.equal(now[k], v) for k, v in before.items())
    (a, b) = results
    for x, y in zip(a.updates, b.updates):
        assert x.layer == y.layer and torch.allclose(x.delta, y.delta, rtol=1e-5, atol=1e-7)
    assert a.after == pytest.approx(b.after, rel=1e-5)


def test_an_offloaded_layer_is_refused_and_nothing_changes(saved_llama, tmp_path, isolated_cache, corpus_file):
    mapped = load_model(str(saved_llama), device_map=LLAMA_MAP, offload_folder=tmp_path / "offload")
    editor = Editor(mapped)
    before = state(mapped)
    with pytest.raises(UnsupportedModelError, match="layer 1 is offloaded"):
        editor.apply(FACTS, hparams=tiny_hparams(editor, "emmet", corpus_file, layers=(1,)))
    assert all(torch.equal(state(mapped)[k], v) for k, v in before.items()) and not editor.history


def test_device_and_device_map_arguments_are_checked(saved_llama):
    with pytest.raises(UnsupportedModelError, match="unknown device map"):
        load_model(str(saved_llama), device_map="everywhere")
    with pytest.raises(UnsupportedModelError, match="either a device or a device map"):
        load_model(str(saved_llama), device="cpu", device_map="auto")
    with pytest.raises(UnsupportedModelError, match="unknown device 'banana'"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_cli_takes_a_device_map_inline_or_from_a_file(saved_llama, tmp_path, isolated_cache, capsys):
    import json

    from emmet_core.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    common = ["stats", "--model", str(saved_llama), "--layers", "2", "--corpus", str(corpus), "--tokens", "500"]
    assert main([*common, "--device-map", json.dumps(LLAMA_MAP)]) == 0
    assert "device map: cpu ×6, disk ×2" in capsys.readouterr().out
    (tmp_path / "map.json").write_text(json.dumps(LLAMA_MAP))
    assert main([*common, "--device-map", str(tmp_path / "map.json")]) == 0
    assert main([*common, "--device-map", "{not json"]) == 2
    assert main([*common, "--device-map", "everywhere"]) == 2
    assert "emmet: error: unknown device map 'everywhere'" in capsys.readouterr().err


def test_device_map_auto_loads_and_edits(saved_llama, tmp_path, isolated_cache, corpus_file):
    """``device_map="auto"`` as a user types it: accelerate places the model on what this
    machine has (the GPU(s) where there are some, else the CPU) and edits work there."""
    mapped = load_model(str(saved_llama), device_map="auto")
    assert mapped.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    editor = Editor(mapped)
    result = editor.apply(FACTS, hparams=tiny_hparams(editor, "emmet", corpus_file))
    assert result.updates[0].delta.norm() > 0
    editor.undo()


if torch.cuda.device_count() >= 2:  # defined only where it can run: nothing skipped elsewhere

    @pytest.mark.gpu
    def test_layers_on_two_gpus_edit_like_one(saved_llama, tmp_path, isolated_cache, corpus_file):
        split = {k: (0 if k in ("model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1")
                     else 1) for k in LLAMA_MAP}
        one = load_model(str(saved_llama), device="cuda:0")
        two = load_model(str(saved_llama), device_map=split)
        results = []
        for loaded in (one, two):
            editor = Editor(loaded)
            results.append(editor.apply(FACTS, hparams=tiny_hparams(editor, "memit", corpus_file, layers=(1, 2))))
            editor.undo()
        for x, y in zip(results[0].updates, results[1].updates):
            assert torch.allclose(x.delta, y.delta, rtol=1e-4, atol=1e-6)
