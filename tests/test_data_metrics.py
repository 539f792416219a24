"""Dataset loaders (both CounterFact layouts, zsRE, bad records) and the metrics on
hand-made inputs with known answers."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SHARED_DATA

from emmet_core.data import BadRecordError, load_dataset, parse_records
from emmet_core.metrics import (
    generation_entropy,
    harmonic_mean,
    kept,
    magnitude,
    mean_delta_norm,
    ngram_entropy,
    success,
    token_accuracy,
)

ROME_RECORD = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"}},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language", "Danielle Darrieux speaks"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Marais speaks"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_rome_layout():
    (record,) = parse_records([ROME_RECORD], "cf").records
    assert record.request.text == "The mother tongue of Danielle Darrieux is"
    assert (record.request.target_new, record.request.target_true) == ("English", "French")
    assert len(record.paraphrase_prompts) == 2 and record.neighborhood_targets == ["French", "French"]
    assert record.generation_prompts == ["Danielle Darrieux's mother tongue is"]


def test_rome_layout_through_the_hub_loader_from_a_local_folder(tmp_path):
    """The ``hf:`` path online users take, fed a local folder (no network): the nested
    ROME layout survives the ``datasets`` round trip."""
    folder = tmp_path / "counterfact-hub"
    folder.mkdir()
    second = json.loads(json.dumps(ROME_RECORD))
    second["case_id"], second["requested_rewrite"]["subject"] = 1, "Michel Rocard"
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in (ROME_RECORD, second)))
    data = load_dataset(f"hf:{folder}:train")
    assert [r.case_id for r in data.records] == [0, 1]
    assert data.records[1].request.text == "The mother tongue of Michel Rocard is"
    assert data.records[0].generation_prompts == ["Danielle Darrieux's mother tongue is"]


def test_mend_layout_from_shared_data():
    data = load_dataset(str(SHARED_DATA / "counterfact" / "counterfact-edit.json"))
    assert data.kind == "counterfact" and len(data.records) == 10_000 and not data.skipped
    first = data.records[0]
    assert first.request.subject == "Danielle Darrieux" and first.request.target_true == "French"
    assert first.neighborhood_prompts == ["Michel Rocard is a native speaker of"]
    # no generation prompts in this layout: derived from the rewrite and the paraphrase
    assert first.generation_prompts == [first.request.text, first.paraphrase_prompts[0]]


def test_zsre_layout_from_shared_data():
    data = load_dataset(str(SHARED_DATA / "zsre" / "zsre_mend_eval.json"), skip_bad=True)
    assert data.kind == "zsre" and len(data.records) + len(data.skipped) == 1037
    first = data.records[0]
    assert first.request.target_new == "2006" and first.neighborhood_targets == ["The String"]


def test_bad_records_are_named_or_skipped(tmp_path):
    good = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Darrieux speaks",
            "locality_prompt": "Rocard speaks", "locality_ground_truth": "French"}
    bad_subject = {**good, "case_id": 8, "subject": "Nobody"}
    no_target = {**good, "case_id": 9, "target_new": ""}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([good, bad_subject, no_target]))
    with pytest.raises(BadRecordError, match=r"record 1 \(case_id 8\).*does not occur"):
        load_dataset(str(path))
    data = load_dataset(str(path), skip_bad=True)
    assert [r.case_id for r in data.records] == [7] and [i for i, _ in data.skipped] == [1, 2]
    assert "target_new" in data.skipped[1][1]


def test_efficacy_neighbourhood_and_magnitude():
    nll_new, nll_true = [0.1, 2.0, 1.0, 3.0], [1.0, 1.0, 2.0, 0.5]
    assert success(nll_new, nll_true) == 0.5
    assert kept(nll_new, nll_true) == 0.5
    expected = sum(math.exp(-n) - math.exp(-t) for n, t in zip(nll_new, nll_true)) / 4
    assert magnitude(nll_new, nll_true) == pytest.approx(expected)


def test_ngram_entropy_known_values():
    assert ngram_entropy("a b a b a", 2) == pytest.approx(1.0)  # (a,b) x2, (b,a) x2
    assert ngram_entropy("x x x x", 2) == 0.0  # one bigram repeated
    assert ngram_entropy("one two three four five", 3) == pytest.approx(math.log2(3))
    assert ngram_entropy("", 2) == 0.0


def test_generation_entropy_weights_and_repetition():
    text = "one two three four five"
    assert generation_entropy(text) == pytest.approx(math.log2(4) / 3 + 2 * math.log2(3) / 3)
    fluent = "Paris is the capital of France and the largest city in the country, with museums."
    assert generation_entropy(fluent) > generation_entropy("English English English English English")


def test_score_and_token_accuracy():
    assert harmonic_mean(1.0, 1.0, 1.0) == 1.0
    assert harmonic_mean(1.0, 0.5, 0.25) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean(1.0, 0.0, 1.0) == 0.0
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75


def test_mean_delta_norm_combines_layers_then_averages_chunks():
    lines = [{"chunk": 0, "delta_norms": {"2": 3.0, "3": 4.0}}, {"chunk": 0, "delta_norms": {"2": 3.0, "3": 4.0}},
             {"chunk": 1, "delta_norms": {"4": 1.0}}, {"chunk": 2, "delta_norms": {}}]
    assert mean_delta_norm(lines) == pytest.approx(3.0)  # (5 + 1) / 2; the unedited chunk does not count
    assert mean_delta_norm([]) is None


def test_the_library_and_cli_import_without_the_app_extras(tmp_path):
    """`pip install emmet-studio` (no [app] extra) has no Streamlit or Plotly: the library
    and the command line must import and run their help without them."""
    import subprocess
    import sys

    script = tmp_path / "no_app.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('plotly', 'streamlit', 'kaleido'):\n"
        "            raise ImportError(f'{name} is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import emmet_core, emmet_core.editor, emmet_core.runner, emmet_core.cli, emmet_core.evaluate\n"
        "from emmet_core.studio import workspace, workflows, anatomy\n"
        "from emmet_core import Editor, load_model, score_targets\n"
        "assert not any(m.split('.')[0] in ('plotly', 'streamlit') for m in sys.modules)\n"
        "from emmet_core.cli import main\n"
        "from emmet_core.errors import EditError\n"
        "from emmet_core.plots import plot_batch_sizes\n"
        "try:\n"
        "    plot_batch_sizes([], None)\n"
        "except EditError as exc:\n"
        "    assert 'emmet-studio[app]' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('plotting without Plotly did not say what to install')\n"
        "sys.exit(main(['--help']))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "usage: emmet" in done.stdout


def test_the_extras_declare_what_the_app_needs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    core = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    app = re.search(r"^app = \[(.*)\]$", text, re.MULTILINE).group(1)
    assert "streamlit" not in core and "plotly" not in core
    assert "streamlit" in app and "plotly" in app
    assert '"emmet_core.studio"' in text  # the app's sub-package ships too
