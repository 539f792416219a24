"""Sessions sharing one model (emmet_core.studio.workspace) and the readers the app runs on them,
on tiny random models: isolation, exact replay, undo/reset, bad input, export, batch and
comparison runs."""

from __future__ import annotations

import csv
import io
import json
import threading
import zipfile

import pytest
import torch
from conftest import make_model, make_tokenizer, same_weights, weights_of

from emmet_core import Editor, score_targets
from emmet_core.errors import InvalidRequestError, UnsupportedModelError
from emmet_core.models import prepare
from emmet_core.readout import generate
from emmet_core.request import EditRequest
from emmet_core.studio.anatomy import pictures
from emmet_core.studio.comparison import compare_repeats
from emmet_core.studio.workflows import FactChecks, compare, edit_fact, generate_texts, record_for, run_batch
from emmet_core.studio.workspace import Session, SharedModel

pytestmark = pytest.mark.usefixtures("single_thread")

DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
ROCARD = EditRequest("{} is a native speaker of", "Michel Rocard", "German", "French")
TOKO = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")


def tiny_loaded(tokenizer, device="cpu"):
    return prepare(make_model("llama", len(tokenizer)), tokenizer, "tiny-llama", device)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer("bpe")


@pytest.fixture
def shared(tokenizer, device, isolated_cache, corpus_file):
    shared = SharedModel(tiny_loaded(tokenizer, device))
    shared.corpus = corpus_file
    return shared


def hp(session: Session, algorithm: str, corpus, layers=None):
    layers = layers or ((1, 2) if algorithm == "memit" else (2,))
    return session.hparams(algorithm, layers=layers, v_num_grad_steps=8, context_templates=((3, 2),),
                           stats_corpus=str(corpus), stats_tokens=3000)


def p_new(loaded, request: EditRequest) -> float:
    return score_targets(loaded, [request.text], [request.target_new])[0].prob


def view(session: Session) -> dict[str, torch.Tensor]:
    return session.run(lambda loaded: weights_of(loaded.model))


def test_two_sessions_never_see_each_others_edits(shared):
    original = weights_of(shared.loaded.model)
    a, b = Session(shared), Session(shared)
    p_before = b.run(lambda loaded: p_new(loaded, DARRIEUX))
    a.edit([DARRIEUX], "rome", hparams=hp(a, "rome", shared.corpus))
    assert same_weights(shared.loaded.model, original)  # at rest the model is always original
    seen_by_a = view(a)
    assert not torch.equal(seen_by_a["model.layers.2.mlp.down_proj.weight"],
                           original["model.layers.2.mlp.down_proj.weight"])
    assert b.run(lambda loaded: same_weights(loaded.model, original))
    assert b.run(lambda loaded: p_new(loaded, DARRIEUX)) == p_before
    assert a.run(lambda loaded: p_new(loaded, DARRIEUX)) != p_before
    b.edit([TOKO], "emmet", hparams=hp(b, "emmet", shared.corpus, layers=(1,)))
    assert a.run(lambda loaded: same_weights(loaded.model, seen_by_a))  # B's edit is not in A's view
    assert b.run(lambda loaded: torch.equal(loaded.model.model.layers[2].mlp.down_proj.weight,
                                            original["model.layers.2.mlp.down_proj.weight"]))
    assert [len(a.records), len(b.records)] == [1, 1]
    assert same_weights(shared.loaded.model, original)


def test_concurrent_sessions_wait_for_each_other(shared):
    """Two threads edit at once; the lock serialises them and each keeps only its edit."""
    original = weights_of(shared.loaded.model)
    sessions = [Session(shared), Session(shared)]
    hps = [hp(sessions[0], "rome", shared.corpus), hp(sessions[1], "rome", shared.corpus)]
    waited: list[int] = []
    errors: list[BaseException] = []

    def work(i: int, request: EditRequest) -> None:
        try:
            for _ in range(2):
                sessions[i].edit([request], "rome", hparams=hps[i], on_wait=lambda: waited.append(i))
                sessions[i].undo()
            sessions[i].edit([request], "rome", hparams=hps[i], on_wait=lambda: waited.append(i))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(0, DARRIEUX)), threading.Thread(target=work, args=(1, ROCARD))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    alone = Session(shared)
    alone.edit([DARRIEUX], "rome", hparams=hps[0])
    assert torch.equal(view(sessions[0])["model.layers.2.mlp.down_proj.weight"],
                       view(alone)["model.layers.2.mlp.down_proj.weight"])
    assert not torch.equal(view(sessions[1])["model.layers.2.mlp.down_proj.weight"],
                           view(alone)["model.layers.2.mlp.down_proj.weight"])
    assert same_weights(shared.loaded.model, original)


def test_a_session_replays_to_the_editors_weights_bit_for_bit(shared, tokenizer):
    """Writing a session (original + its deltas in order) gives exactly what an Editor
    applying the same edits to its own copy of the model produces."""
    session = Session(shared)
    plain = Editor(tiny_loaded(tokenizer, shared.loaded.device))
    for algorithm, request in (("rome", DARRIEUX), ("memit", ROCARD), ("emmet", TOKO)):
        settings = hp(session, algorithm, shared.corpus)
        session.edit([request], algorithm, hparams=settings)
        plain.apply([request], hparams=settings)
        assert session.run(lambda loaded: same_weights(loaded.model, weights_of(plain.loaded.model))), algorithm


def test_half_precision_replays_are_bit_exact_by_construction(tokenizer, device, isolated_cache, corpus_file):
    """A bfloat16 model: a float64 Δ rounds to bfloat16 once, when the delta is made, so
    replaying a session (original + its deltas) gives what a plain Editor made."""
    shared = SharedModel(prepare(make_model("llama", len(tokenizer)).to(torch.bfloat16), tokenizer, "tiny-bf16",
                                 device))
    plain = Editor(prepare(make_model("llama", len(tokenizer)).to(torch.bfloat16), tokenizer, "tiny-bf16", device))
    session = Session(shared)
    for algorithm, request in (("rome", DARRIEUX), ("memit", ROCARD), ("emmet", TOKO)):
        settings = hp(session, algorithm, corpus_file)
        session.edit([request], algorithm, hparams=settings)
        plain.apply([request], hparams=settings)
        assert all(d.change.dtype == torch.bfloat16 for d in session.records[-1].deltas)
        assert session.run(lambda loaded: same_weights(loaded.model, weights_of(plain.loaded.model))), algorithm


def test_undo_and_reset(shared):
    original = weights_of(shared.loaded.model)
    session = Session(shared)
    session.edit([DARRIEUX], "rome", hparams=hp(session, "rome", shared.corpus))
    after_first = view(session)
    session.edit([TOKO], "emmet", hparams=hp(session, "emmet", shared.corpus, layers=(1,)))
    assert session.undo().algorithm == "emmet"
    assert session.run(lambda loaded: same_weights(loaded.model, after_first))
    session.reset()
    assert session.run(lambda loaded: same_weights(loaded.model, original)) and session.records == []
    with pytest.raises(InvalidRequestError, match="nothing to undo"):
        session.undo()


BAD = {
    "conflicting objects": ([DARRIEUX, EditRequest(DARRIEUX.prompt, DARRIEUX.subject, "German", "French")], {},
                            InvalidRequestError, "conflicting edits"),
    "subject not in prompt": ([{"prompt": "The mother tongue of Michel Rocard is", "subject": "Danielle Darrieux",
                                "target_new": "English"}], {}, InvalidRequestError, "does not occur"),
    "layer out of range": ([DARRIEUX], {"layers": (9,)}, UnsupportedModelError, r"layers 0\.\.3"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_changes_nothing(shared, case):
    batch, settings, error, message = BAD[case]
    session = Session(shared)
    session.edit([TOKO], "emmet", hparams=hp(session, "emmet", shared.corpus, layers=(1,)))
    mine, original = view(session), weights_of(shared.loaded.model)
    with pytest.raises(error, match=message):
        session.edit(batch, "emmet", hparams=hp(session, "emmet", shared.corpus).replace(**settings))
    assert len(session.records) == 1 and session.run(lambda loaded: same_weights(loaded.model, mine))
    assert same_weights(shared.loaded.model, original)


def test_edit_report_log_and_export(shared, tmp_path):
    session = Session(shared)
    checks = FactChecks(["Danielle Darrieux grew up speaking"], [("The mother tongue of Michel Rocard is", None)],
                        gen_tokens=8)
    phases: list[str] = []
    report = edit_fact(session, DARRIEUX, checks, "rome", hp(session, "rome", shared.corpus), on_phase=phases.append)
    assert phases[:4] == ["prepare", "before", "stats", "templates"] and phases[-1] == "after"
    assert {"keys", "values", "solve"} <= set(phases) and phases.count("prepare") == 1
    assert report.after.rewrite.p_new != report.before.rewrite.p_new
    assert checks.neighbours[0][1]  # the neighbour's object is the model's own answer, fixed before the edit
    assert report.after.neighbours[0].true == report.before.neighbours[0].true == checks.neighbours[0][1]
    assert report.texts_pending and report.after.texts == []  # probabilities first, texts on demand
    streamed: list[tuple[str, list[str]]] = []
    generate_texts(session, report, on_text=lambda side, texts: streamed.append((side, texts)))
    assert len(report.before.texts) == len(report.after.texts) == 2 and not report.texts_pending
    assert [side for side, _ in streamed] == ["before"] * 7 + ["after"] * 7  # 8 tokens: seen before tokens 2…8
    final = {side: texts for side, texts in streamed}
    assert all(report.after.texts[i].startswith(final["after"][i]) for i in range(2))
    # The "before" texts are those of the weights just before this edit, read after it.
    fresh = Session(shared)
    assert fresh.run(lambda loaded: generate(loaded, [report.generation_prompts[0]], 8, top_k=5, seed=0)) == \
        report.before.texts[:1]
    log = json.loads(session.log_json())
    assert log["model"] == "tiny-llama" and log["edits"][0]["summary"]["p_new"][1] == report.after.rewrite.p_new
    assert log["edits"][0]["layers"] == [2] and log["edits"][0]["requests"][0]["target_new"] == "English"
    path = session.save_pretrained(tmp_path / "edited")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert same_weights(reloaded, view(session))
    with zipfile.ZipFile(io.BytesIO(session.export_zip())) as archive:
        assert {"model/model.safetensors", "model/config.json"} <= set(archive.namelist())
    shot = pictures(session.records[-1].results)[0]
    assert shot.rank == 1 and shot.layer == 2
    assert float(shot.residual_after[0]) < 1e-3 * float(shot.residual_before[0])  # ROME hits v* exactly


def test_batch_run_is_one_undoable_record(shared):
    session = Session(shared)
    records = [record_for(r, [f"Indeed, {r.text}"], [("The mother tongue of Michel Rocard is", "French")], i)
               for i, r in enumerate([DARRIEUX, TOKO])]
    chunks: list[tuple[int, int]] = []
    report = run_batch(session, records, "emmet", hp(session, "emmet", shared.corpus), chunk_size=1,
                       on_chunk=lambda i, n: chunks.append((i, n)))
    assert chunks == [(1, 2), (2, 2)] and len(session.records) == 1 and len(report.record.results) == 2
    assert {"ES", "PS", "NS", "S"} <= set(report.after[0]) and report.summary_before.keys() >= {"ES", "S"}
    assert report.rows()[1]["prompt"] == TOKO.text
    session.undo()
    assert session.records == []


def test_compare_starts_every_editor_from_the_original_weights(shared):
    original = weights_of(shared.loaded.model)
    session = Session(shared)
    session.edit([DARRIEUX], "rome", hparams=hp(session, "rome", shared.corpus))
    mine = view(session)
    records = [record_for(EditRequest(DARRIEUX.prompt, DARRIEUX.subject, "German"), [], [])]
    settings = {a: hp(session, a, shared.corpus) for a in ("rome", "memit", "emmet")}
    settings["memit"] = settings["memit"].replace(layers=(9,))  # one editor fails, the others still run
    rows = compare(shared, records, ["rome", "memit", "emmet"], settings)
    assert [r.algorithm for r in rows] == ["unedited", "rome", "memit", "emmet"]
    assert "out of range" in rows[2].error and rows[1].error is None and rows[3].layers == [2]
    # The unedited row reads the original model, not the session's edit (which made German less likely).
    assert rows[0].p_new[0] == Session(shared).run(lambda loaded: score_targets(
        loaded, [DARRIEUX.text], ["German"])[0].prob)
    assert rows[1].p_new[0] != rows[0].p_new[0] and rows[1].delta_norm > 0
    assert session.run(lambda loaded: same_weights(loaded.model, mine)) and len(session.records) == 1
    assert same_weights(shared.loaded.model, original)


def test_compare_repeats_keeps_every_fact_and_spreads_over_seeds(shared):
    records = [record_for(r, [f"Indeed, {r.text}"], [("The mother tongue of Michel Rocard is", "French")], i)
               for i, r in enumerate([DARRIEUX, ROCARD, TOKO])]
    session = Session(shared)
    settings = {a: hp(session, a, shared.corpus) for a in ("rome", "emmet", "memit")}
    settings["memit"] = settings["memit"].replace(layers=(9,))  # refused in every repeat
    run = compare_repeats(shared, records, ["rome", "emmet", "memit"], repeats=2, seed=3, gen_tokens=4,
                          hparams=settings, source={"source": "test"})
    assert run.seeds == [3, 4] and run.facts == 3 and run.editors == ["unedited", "rome", "emmet", "memit"]
    for seed, rows in zip(run.seeds, run.repeats):
        assert [r.seed for r in rows] == [seed] * 4 and [r.hparams.get("seed") for r in rows[1:3]] == [seed] * 2
        for row in rows[:3]:
            assert [f["case_id"] for f in row.per_fact] == [0, 1, 2]
            for metric in ("ES", "PS", "NS", "EM", "PM", "NM", "GE"):  # the means are the mean of the facts
                assert row.metrics[metric] == pytest.approx(sum(f[metric] for f in row.per_fact) / 3)
            for fact in row.per_fact:  # the judgement, its margin and ES say the same
                assert (fact["judgement"] in ("pass", "weak")) == (fact["ES"] == 100.0) == (fact["ES_margin"] > 0)
        assert "out of range" in rows[3].error and rows[3].per_fact == []
    rome = run.rows_of("rome")
    assert rome[0].norms != rome[1].norms  # another seed, other context templates, another update
    unedited = run.rows_of("unedited")
    assert unedited[0].metrics["ES"] == unedited[1].metrics["ES"]  # the facts and the weights are the same
    new, true = Session(shared).run(lambda loaded: score_targets(loaded, [DARRIEUX.text] * 2, ["English", "French"]))
    assert unedited[0].per_fact[0]["ES_margin"] == pytest.approx(true.mean_nll - new.mean_nll, abs=1e-4)
    summary = run.summary()
    assert summary["rome"]["ES"]["n"] == 2 and summary["rome"]["delta_norm"]["std"] > 0
    assert "delta_norm" not in summary["unedited"] and summary["memit"] == {}
    facts = run.fact_rows()
    assert len(facts) == 3 * 4 * 2 and {(f["editor"], f["repeat"], f["case_id"]) for f in facts} == {
        (e, r, c) for e in run.editors for r in (1, 2) for c in range(3)}
    assert all(f["error"] for f in facts if f["editor"] == "memit")
    lines = list(csv.DictReader(io.StringIO(run.to_csv())))
    assert len(lines) == 3 * 4 * 2 + 4 * 2 and {line["row"] for line in lines} == {"fact", "mean"}
    mean = next(line for line in lines if line["row"] == "mean" and line["editor"] == "rome" and line["seed"] == "4")
    assert json.loads(mean["hparams"])["seed"] == 4 and float(mean["ES"]) == pytest.approx(rome[1].metrics["ES"])
    saved = json.loads(run.to_json())
    assert saved["facts"] == {"source": "test", "count": 3} and saved["seeds"] == [3, 4]
    assert "python" in saved["versions"] and saved["summary"]["rome"]["ES"]["n"] == 2
    assert len(saved["runs"][1]["rows"][1]["per_fact"]) == 3
    for bad in (0, 6, 1.5):
        with pytest.raises(InvalidRequestError, match="repeats"):
            compare_repeats(shared, records, ["rome"], repeats=bad)
    with pytest.raises(InvalidRequestError, match="editor"):
        compare_repeats(shared, records, [])


def test_value_cache_is_used_only_on_the_original_weights(shared, isolated_cache):
    session = Session(shared)
    settings = hp(session, "rome", shared.corpus)
    session.edit([DARRIEUX], "rome", hparams=settings, cache_values=True)
    cached = sorted((isolated_cache / "values").rglob("*.safetensors"))
    assert len(cached) == 1
    first = view(session)
    session.undo()
    session.edit([DARRIEUX], "rome", hparams=settings, cache_values=True)
    assert session.run(lambda loaded: same_weights(loaded.model, first))
    session.edit([TOKO], "rome", hparams=settings, cache_values=True)  # on edited weights: computed afresh
    assert sorted((isolated_cache / "values").rglob("*.safetensors")) == cached


def test_a_reader_that_will_not_wait_is_told_the_model_is_busy(shared):
    from emmet_core.studio.workspace import ModelBusyError

    session = Session(shared)
    waited: list[bool] = []
    with shared.locked():  # another session's long edit
        with pytest.raises(ModelBusyError, match="busy"):
            session.answer(["The mother tongue of Danielle Darrieux is"], timeout=0.05)
        with pytest.raises(ModelBusyError):
            session.run(lambda loaded: None, on_wait=lambda: waited.append(True), timeout=0.05)
    assert waited == [True]
    assert session.answer(["The mother tongue of Danielle Darrieux is"], timeout=0.05)  # free again


def test_the_edit_page_and_compare_give_the_same_numbers_for_the_same_edit(shared):
    """Same fact, editor and settings: the Edit page's path (edit_fact) and Compare's
    (compare) must report the same ‖Δ‖ and the same probabilities."""
    hparams = hp(Session(shared), "emmet", shared.corpus)
    request = EditRequest(DARRIEUX.prompt, DARRIEUX.subject, DARRIEUX.target_new)
    report = edit_fact(Session(shared), request, FactChecks(), "emmet", hparams)
    (_, row) = compare(shared, [record_for(request, [], [])], ["emmet"], hparams={"emmet": hparams})
    assert row.norms == report.record.norms
    assert row.p_new == [report.after.rewrite.p_new] and row.p_true == [report.after.rewrite.p_true]


class _Interrupted(BaseException):
    """What Streamlit raises inside a running script when the user clicks Cancel."""


def test_a_cancelled_edit_changes_nothing_and_frees_the_model(shared):
    session = Session(shared)
    original = weights_of(shared.loaded.model)

    def cancel_in_values(phase: str) -> None:
        if phase.startswith("values: step 2"):  # between two optimisation steps
            raise _Interrupted

    with pytest.raises(_Interrupted):
        edit_fact(session, DARRIEUX, FactChecks(), "rome", hp(session, "rome", shared.corpus),
                  on_phase=cancel_in_values)
    assert session.records == [] and same_weights(shared.loaded.model, original)
    assert not shared.lock.locked()
    report = edit_fact(session, DARRIEUX, FactChecks(), "rome", hp(session, "rome", shared.corpus))
    assert session.records == [report.record]  # the next edit runs as usual
