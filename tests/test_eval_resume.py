"""The eval runner's resume and its early checks, on a tiny model: an --out folder is
resumed only by the run that wrote it, and what needs no model is refused before any
record is scored."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tiny

from emmet_core import Editor
from emmet_core.data import Dataset, EvalRecord
from emmet_core.errors import EditError, UnsupportedModelError
from emmet_core.request import EditRequest
from emmet_core.runner import EvalConfig, run_eval

FACTS = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
         EditRequest("{} is the capital of", "Berlin", "Italy", "Germany"),
         EditRequest("{} plays the", "Miles Davis", "violin", "trumpet")]


@pytest.fixture
def run(tokenizers, isolated_cache, corpus_file, tmp_path):
    overrides = {"layers": [2], "v_num_grad_steps": 2, "context_templates": [[3, 2]],
                 "stats_corpus": str(corpus_file), "stats_tokens": 500}
    records = [EvalRecord(i, r, [r.text], [], [], []) for i, r in enumerate(FACTS)]

    def go(loaded, records=records, **changes):
        config = EvalConfig("emmet", gen_tokens=2, overrides={**overrides, **changes.pop("overrides", {})}, **changes)
        return run_eval(Editor(loaded), Dataset("tiny", "counterfact", records), config, tmp_path / "out", "tiny",
                        progress=False)
    return go, records


def test_a_resume_refuses_another_runs_folder(run, tokenizers):
    go, records = run
    loaded = tiny("llama", tokenizers)
    go(loaded, records[:2])
    with pytest.raises(EditError, match="differs in records"):
        go(loaded, records[1:3])  # another --offset: same count, other records
    with pytest.raises(EditError, match="differs in records"):
        go(loaded, records)  # another --n
    with pytest.raises(EditError, match="differs in model"):
        go(tiny("gpt2", tokenizers), records[:2])
    other = [dataclasses.replace(r, request=dataclasses.replace(r.request, target_new="Spanish")) for r in records[:2]]
    with pytest.raises(EditError, match="differs in records"):
        go(loaded, other)  # another data file with the same case ids
    assert go(loaded, records[:2])["complete"]  # the same run resumes (here: is already done)


def test_bad_layers_are_refused_before_any_record_is_scored(run, tokenizers, tmp_path):
    go, _ = run
    with pytest.raises(UnsupportedModelError, match="layer 9 is out of range"):
        go(tiny("llama", tokenizers), overrides={"layers": [9]})
    assert not (tmp_path / "out" / "records.jsonl").exists()


def test_a_run_cut_inside_a_chunk_redoes_that_chunk_once(run, tokenizers, tmp_path):
    """An interruption while a chunk's lines were being written leaves part of the chunk:
    the resume drops it and redoes the whole chunk, so no record is there twice."""
    go, _ = run
    loaded = tiny("llama", tokenizers)
    go(loaded, batch_size=2)
    path = tmp_path / "out" / "records.jsonl"
    whole = path.read_text().splitlines()
    path.write_text(whole[0] + "\n")  # one line of the first chunk of two
    assert go(loaded, batch_size=2)["n"] == 3
    again = path.read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in again] == [0, 1, 2]
