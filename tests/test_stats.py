"""Covariance statistics: exact against a direct computation, only the needed layers
run, corpora of every kind, and a cache that refuses corrupt or mismatched files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny

from emmet_core.errors import StatsCacheError
from emmet_core.hooks import capture_inputs
from emmet_core.stats import _cache_path, compute_covariances, corpus_texts, layer_covariances, token_sequences


def test_covariance_matches_direct_computation(device, tokenizers, corpus_file):
    """The sums stay on the model's device in float64 and are read back once: they equal
    Kᵀ K / n over every key of the corpus, gathered one sequence at a time."""
    loaded = tiny("gpt2", tokenizers, device)
    covs, seen = compute_covariances(loaded, [1, 2], str(corpus_file), n_tokens=700, seq_len=64,
                                     batch_size=3, progress=False)
    assert seen == 700
    keys = {1: [], 2: []}
    for sequence in token_sequences(loaded.tokenizer, str(corpus_file), 700, 64):
        modules = {layer: loaded.adapter.mlp_out(layer) for layer in (1, 2)}
        with torch.no_grad(), capture_inputs(modules) as captured:
            loaded.model(input_ids=torch.tensor([sequence], device=device))
        for layer in (1, 2):
            keys[layer].append(captured[layer][0].double().cpu())
    for layer in (1, 2):
        k = torch.cat(keys[layer])
        assert k.shape[0] == 700
        assert torch.allclose(covs[layer], k.T @ k / 700, rtol=1e-6, atol=1e-9)


def test_sequences_are_full_length_with_bos(tokenizers, corpus_file):
    loaded = tiny("llama", tokenizers)  # SentencePiece tokenizer that adds <s>
    sequences = list(token_sequences(loaded.tokenizer, str(corpus_file), 1000, 50))
    bos = tokenizers["sp"].bos_token_id
    assert all(s[0] == bos for s in sequences)
    assert all(len(s) == 50 for s in sequences[:-1]) and sum(map(len, sequences)) == 1000


def test_documents_tokenised_together_give_the_same_stream_as_one_by_one(tokenizers, corpus_file):
    loaded = tiny("gpt2", tokenizers)
    one = list(token_sequences(loaded.tokenizer, str(corpus_file), 2000, 40, docs_per_call=1))
    many = list(token_sequences(loaded.tokenizer, str(corpus_file), 2000, 40, docs_per_call=64))
    assert one == many and sum(map(len, many)) == 2000


def test_forward_precision_is_part_of_the_cache_key(tokenizers, corpus_file, isolated_cache):
    """A C0 whose forward ran in bfloat16 is close to the float32 one, but a different
    file: asking for either never returns the other."""
    loaded = tiny("llama", tokenizers)
    exact = layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False)[1]
    rounded = layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False,
                                precision="bfloat16")[1]
    assert not torch.equal(exact, rounded)
    assert float((exact - rounded).norm() / exact.norm()) < 0.05
    files = {p.name for p in (isolated_cache / "stats").rglob("*.safetensors")}
    assert len(files) == 2 and any(name.endswith("-bfloat16.safetensors") for name in files)
    again = layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False)[1]
    assert torch.equal(again, exact)
    with pytest.raises(ValueError, match="stats_precision"):
        layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False, precision="fp8")


def test_only_layers_up_to_the_deepest_run(tokenizers, corpus_file):
    loaded = tiny("llama", tokenizers)
    calls = []
    handle = loaded.adapter.layer(3).register_forward_hook(lambda *a: calls.append(1))
    try:
        compute_covariances(loaded, [1], str(corpus_file), n_tokens=300, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_cache_is_reused_and_corruption_detected(tokenizers, corpus_file, isolated_cache, caplog):
    loaded = tiny("llama", tokenizers)
    first = layer_covariances(loaded, [1, 2], str(corpus_file), n_tokens=500, progress=False)
    path = _cache_path(loaded, 1, str(corpus_file), 500, torch.float64)
    assert path.is_file()
    again = layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False)
    assert torch.equal(again[1], first[1])

    data = bytearray(path.read_bytes())  # flip one byte of the tensor payload
    data[-9] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        repaired = layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False)
    assert "corrupt" in caplog.text
    assert torch.equal(repaired[1], first[1])

    path.write_bytes(b"not a safetensors file")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False)
    assert "unreadable" in caplog.text

    # A valid file for another layer, put where layer 1's should be: caught by metadata.
    path.write_bytes(_cache_path(loaded, 2, str(corpus_file), 500, torch.float64).read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fixed = layer_covariances(loaded, [1], str(corpus_file), n_tokens=500, progress=False)
    assert "made for something else" in caplog.text and torch.equal(fixed[1], first[1])


def test_local_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n"two"\n\n{"other": 1}\n')
    (tmp_path / "b.json").write_text(json.dumps({"X": {"title": "X", "extract": "three"}}))
    (tmp_path / "c.json").write_text(json.dumps([{"text": "four"}, "five"]))
    (tmp_path / "d.txt").write_text("six\n\nseven")
    assert list(corpus_texts(str(tmp_path / "a.jsonl"))) == ["one", "two"]
    assert list(corpus_texts(str(tmp_path / "b.json"))) == ["three"]
    assert list(corpus_texts(str(tmp_path / "c.json"))) == ["four", "five"]
    assert list(corpus_texts(str(tmp_path / "d.txt"))) == ["six", "seven"]
    with pytest.raises(StatsCacheError, match="unknown corpus"):
        list(corpus_texts("no-such-corpus"))


def test_hub_dataset_path_with_local_files(tmp_path):
    """The `datasets` code path users take online, here on a local data folder."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
    assert list(corpus_texts(f"hf:{folder}")) == [f"doc {i}" for i in range(5)]


def test_default_offline_corpus_is_wikipedia():
    texts = corpus_texts("wiki-offline")
    first = [next(texts) for _ in range(3)]
    assert all(len(t) > 50 for t in first)
