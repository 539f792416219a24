"""Lifelong runs (emmet eval --sequential --checkpoint-every K) on a tiny model: curves at
every checkpoint, what they measure, and a resume that keeps them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny

from emmet_core import Editor
from emmet_core.data import Dataset, EvalRecord
from emmet_core.errors import EditError
from emmet_core.lifelong import perplexity
from emmet_core.request import EditRequest
from emmet_core.runner import EvalConfig, run_eval

FACTS = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
         EditRequest("{} is the capital of", "Berlin", "Italy", "Germany"),
         EditRequest("{} plays the", "Miles Davis", "violin", "trumpet"),
         EditRequest("{} was created by", "Apple Watch", "Microsoft", "Apple"),
         EditRequest("{} is a native speaker of", "Michel Rocard", "German", "French"),
         EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris"),
         EditRequest("{} speaks", "Toko Yasuda", "Spanish", "Japanese"),
         EditRequest("{} was developed by", "Windows", "Google", "Microsoft")]


def records(requests):
    return [EvalRecord(i, r, [r.text.replace(" is", " was", 1)], [f"{r.subject} lives in"], [r.target_true],
                       [r.text]) for i, r in enumerate(requests)]


@pytest.mark.parametrize("algorithm", ["emmet", "alphaedit", "encore"])
def test_checkpoints_measure_the_run_and_survive_a_resume(algorithm, tokenizers, isolated_cache, corpus_file,
                                                          tmp_path):
    loaded = tiny("llama", tokenizers)
    overrides = {"layers": [1, 2], "v_num_grad_steps": 4, "context_templates": [[3, 2]],
                 "stats_corpus": str(corpus_file), "stats_tokens": 500, "nullspace_threshold": 1e6}
    run, held = records(FACTS[:6]), records(FACTS[6:])
    config = EvalConfig(algorithm, batch_size=2, sequential=True, gen_tokens=4, overrides=overrides,
                        checkpoint_every=2, retention=4, heldout=2, documents=5)
    out = tmp_path / "run"
    summary = run_eval(Editor(loaded), Dataset("tiny", "counterfact", run), config, out, "tiny", progress=False,
                       heldout=held)
    assert summary["complete"] and summary["n"] == 6
    lines = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
    assert [line["edits"] for line in lines] == [0, 2, 4, 6]
    first, last = lines[0], lines[-1]
    assert first["retention_n"] == 0 and first["delta_norms"] == {"1": 0.0, "2": 0.0}
    assert last["retention_n"] == 3 and set(last["retention"]) >= {"ES", "PS", "NS", "S"}  # positions 0, 2, 4
    assert last["delta_norms"]["2"] > 0 and last["weight_norms"]["2"] > 0 and last["newest"]["ES"] >= 0
    for line in lines:
        assert line["perplexity"] > 1 and line["GE"] >= 0 and 0 <= line["heldout_kept"] <= 100
        assert isinstance(line["text"], str) and line["seconds"] >= 0
    # Interrupted after the second chunk: records and curves are kept, the rest is redone.
    (out / "records.jsonl").write_text("".join(x + "\n" for x in (out / "records.jsonl").read_text().splitlines()[:4]))
    (out / "curves.jsonl").write_text("".join(x + "\n" for x in (out / "curves.jsonl").read_text().splitlines()[:3]))
    again = run_eval(Editor(tiny("llama", tokenizers)), Dataset("tiny", "counterfact", run), config, out, "tiny",
                     progress=False, heldout=held)
    resumed = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
    assert [line["edits"] for line in resumed] == [0, 2, 4, 6] and resumed[:3] == lines[:3]
    assert again["n"] == 6


@pytest.mark.parametrize("algorithm", ["alphaedit", "encore", "rome"])
def test_a_resume_starts_from_the_saved_weights_and_ends_where_an_unbroken_run_does(
        algorithm, tokenizers, isolated_cache, corpus_file, tmp_path, monkeypatch):
    """The state saved after each chunk (edited weights; AlphaEdit's keys of earlier edits)
    lets an interrupted run go on without redoing its edits, to the same records and the
    same weights bit for bit."""
    from emmet_core import runner

    overrides = {"layers": [2], "v_num_grad_steps": 4, "context_templates": [[3, 2]],
                 "stats_corpus": str(corpus_file), "stats_tokens": 500, "nullspace_threshold": 1e6}
    data = Dataset("tiny", "counterfact", records(FACTS[:6]))
    config = EvalConfig(algorithm, batch_size=2, sequential=True, gen_tokens=4, overrides=overrides)

    def go(out):
        editor = Editor(tiny("llama", tokenizers))
        run_eval(editor, data, config, out, "tiny", progress=False)
        return (out / "records.jsonl").read_text(), editor.adapter.weight(2).detach().clone()

    unbroken_records, unbroken_weight = go(tmp_path / "unbroken")
    save, saved = runner._save_state, []

    def interrupted_after_two_chunks(*args, **kwargs):
        save(*args, **kwargs)
        saved.append(args[-1])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "STATE_EVERY", 0.0)  # after every chunk, however quick
    monkeypatch.setattr(runner, "_save_state", interrupted_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "broken")
    monkeypatch.setattr(runner, "_save_state", save)
    applied, apply = [], runner._apply
    monkeypatch.setattr(runner, "_apply", lambda editor, chunk, *rest: applied.append(len(chunk)) or
                        apply(editor, chunk, *rest))
    resumed_records, resumed_weight = go(tmp_path / "broken")
    assert applied == [2]  # only the third chunk: the first two came back from the saved state
    assert resumed_records == unbroken_records and torch.equal(resumed_weight, unbroken_weight)


def test_checkpoints_need_a_sequential_run(tokenizers, isolated_cache, corpus_file, tmp_path):
    config = EvalConfig("emmet", batch_size=2, checkpoint_every=2,
                        overrides={"stats_corpus": str(corpus_file), "stats_tokens": 500, "layers": [2]})
    with pytest.raises(EditError, match="--sequential"):
        run_eval(Editor(tiny("llama", tokenizers)), Dataset("tiny", "counterfact", records(FACTS[:2])), config,
                 tmp_path / "x", "tiny", progress=False)


def test_perplexity_is_exp_of_the_mean_token_nll(tokenizers):
    import math

    import torch

    loaded = tiny("gpt2", tokenizers)
    text = "Berlin is the capital of Germany and Rome is the capital of Italy."
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logp = loaded.model(ids).logits[0, :-1].float().log_softmax(-1)
    expected = math.exp(float(-logp.gather(1, ids[0, 1:, None]).mean()))
    assert perplexity(loaded, [text]) == pytest.approx(expected, rel=1e-4)


def test_the_plot_draws_several_lifelong_runs_on_one_figure(tokenizers, isolated_cache, corpus_file, tmp_path, capsys):
    from emmet_core.cli import main

    loaded = tiny("llama", tokenizers)
    overrides = {"layers": [2], "v_num_grad_steps": 3, "context_templates": [[3, 2]],
                 "stats_corpus": str(corpus_file), "stats_tokens": 500, "nullspace_threshold": 1e6}
    for algorithm in ("memit", "alphaedit"):
        config = EvalConfig(algorithm, batch_size=2, sequential=True, gen_tokens=3, overrides=overrides,
                            checkpoint_every=2, retention=4, documents=3)
        run_eval(Editor(loaded), Dataset("tiny", "counterfact", records(FACTS[:4])), config, tmp_path / algorithm,
                 "tiny", progress=False, heldout=records(FACTS[4:6]))
        loaded = tiny("llama", tokenizers)
    assert main(["eval", "--plot", str(tmp_path / "memit"), str(tmp_path / "alphaedit"), "--out",
                 str(tmp_path / "fig")]) == 0
    html = (tmp_path / "fig" / "curves.html").read_text()
    assert "memit b2" in html and "alphaedit b2" in html and "perplexity" in html
    table = (tmp_path / "fig" / "table.md").read_text()
    assert "| MEMIT b2 | 4 |" in table and "| ALPHAEDIT b2 | 4 |" in table
    assert table.count("| unedited | 0 |") == 1  # the same model and held-out facts: measured alike


def test_an_app_run_streams_two_editors_side_by_side_without_touching_anyone(tokenizers, isolated_cache,
                                                                              corpus_file):
    from conftest import same_weights, weights_of

    from emmet_core.studio.lifelong_run import LifelongRun
    from emmet_core.studio.workspace import Session, SharedModel

    shared = SharedModel(tiny("llama", tokenizers))
    original = weights_of(shared.loaded.model)
    user = Session(shared)  # another visitor, editing meanwhile
    settings = {"layers": (1, 2), "v_num_grad_steps": 3, "context_templates": ((3, 2),),
                "stats_corpus": str(corpus_file), "stats_tokens": 500, "nullspace_threshold": 1e6}
    base = shared.editor.hparams
    shared.editor.hparams = lambda algorithm, **o: base(algorithm, **{**settings, **o})  # tiny settings
    run = LifelongRun(shared, records(FACTS[:4]), ["memit", "encore"], batch_size=2, checkpoint_every=2,
                      heldout=records(FACTS[6:]), documents=["Berlin is the capital of Germany."] * 2,
                      prompt="The Eiffel Tower is in", gen_tokens=3)
    steps = []
    while not run.done and len(steps) < 20:
        steps.append(run.step())
        assert not shared.lock.locked()  # released between steps: other sessions get their turn
        if len(steps) == 3:
            user.edit([FACTS[7]], "rome", hparams=base("rome", **{**settings, "layers": (2,)}), refuse_current=False)
    assert run.done and run.progress() == 1.0
    for lane in run.lanes:
        assert [c["edits"] for c in lane.curves] == [0, 2, 4] and lane.edited == 4
        assert lane.curves[-1]["delta_norms"]["2"] > 0 and isinstance(lane.curves[-1]["text"], str)
    memit, encore = run.lanes
    seen = [lane.session.run(lambda loaded: weights_of(loaded.model)) for lane in (memit, encore)]
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # each lane its own weights
    assert len(user.records) == 1 and user.records[0].layers == [2]  # the visitor's edit is theirs alone
    assert same_weights(shared.loaded.model, original)  # outside the lock: the original model
    dump = run.to_dict()
    assert [lane["algorithm"] for lane in dump["lanes"]] == ["memit", "encore"] and len(dump["facts"]) == 4
