"""Every page of the Streamlit app through streamlit.testing (AppTest), on a tiny random
GPT-2 saved to disk and opened by path, exactly as a user would open a local model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, labelled, make_model, make_tokenizer, same_weights, weights_of
from streamlit.testing.v1 import AppTest

from emmet_core import score_targets

pytestmark = pytest.mark.usefixtures("single_thread")

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
CSV = ("subject,prompt,target_new,target_true,paraphrase,neighbour_prompt,neighbour_target\n"
       "Danielle Darrieux,The mother tongue of {} is,English,French,Danielle Darrieux grew up speaking,"
       "The mother tongue of Michel Rocard is,French\n"
       "Toko Yasuda,{} plays the,piano,guitar,,,\n")


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """A tiny model directory, a private cache, and the app pointed at both."""
    root = tmp_path_factory.mktemp("app")
    tokenizer = make_tokenizer("bpe")
    model = make_model("gpt2", len(tokenizer))
    model.save_pretrained(root / "tiny-gpt2")
    tokenizer.save_pretrained(root / "tiny-gpt2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMMET_MODEL", str(root / "tiny-gpt2"))
        patch.setenv("EMMET_CACHE_DIR", str(root / "cache"))
        patch.setenv("EMMET_EXPORT_DIR", str(root / "exports"))
        yield {"name": str(root / "tiny-gpt2"), "weights": weights_of(model), "root": root}


def app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=180).run()


def session_of(at: AppTest, tiny: dict):
    return at.session_state["sessions"][tiny["name"]]


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly charts on the page by key, with their figure JSON."""
    return {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def apply_edit(at: AppTest) -> AppTest:
    labelled(at.text_input, "Old object").set_value("French")
    at.number_input(key="gen_tokens").set_value(10)
    return at.button(key="apply").click().run()


def edits_in_sidebar(at: AppTest) -> str:
    return next(m.value for m in at.sidebar.markdown if "in this browser session" in m.value)


def test_edit_page_applies_an_edit_and_shows_every_chart(tiny_app):
    at = app()
    assert not at.exception
    assert at.text_input(key="subject").value == "Danielle Darrieux"
    assert labelled(at.text_input, "Old object").value  # pre-filled with the model's own answer
    assert "Jean Gabin" in labelled(at.text_area, "Neighbours").value  # the example's neighbours
    apply_edit(at)
    assert not at.exception and not at.error
    shown = charts(at)
    assert {"chart_prompt", "chart_paraphrases", "chart_neighbours", "chart_entropy", "chart_norms",
            "chart_phases"} <= set(shown)
    report = at.session_state["edit_report"][1]
    assert shown["chart_prompt"]["data"][0]["y"] == [report.before.rewrite.p_new, report.after.rewrite.p_new]
    assert report.request.target_true == "French" and len(report.after.paraphrases) == 3
    assert edits_in_sidebar(at).startswith("**1 edit**")
    session = session_of(at, tiny_app)
    assert len(session.records) == 1
    assert same_weights(session.shared.loaded.model, tiny_app["weights"])  # shared weights stay original


@pytest.mark.parametrize("algorithm, layers", [("memit", "1-2"), ("emmet", "2")])
def test_edit_page_with_memit_and_emmet_and_their_settings(tiny_app, algorithm, layers):
    at = app()
    at.segmented_control(key="algorithm").set_value(algorithm).run()
    prefix = f"hp.{tiny_app['name']}.{algorithm}."
    at.text_input(key=prefix + "layers").set_value(layers)
    at.number_input(key=prefix + "mom2").set_value(2.0)
    at.number_input(key=prefix + "steps").set_value(6)
    assert at.button(key="apply").label == f"Apply edit with {algorithm.upper()}"
    apply_edit(at)
    assert not at.exception and not at.error
    record = session_of(at, tiny_app).records[0]
    settings = record.results[0].hparams
    assert (settings.algorithm, settings.mom2_update_weight, settings.v_num_grad_steps) == (algorithm, 2.0, 6)
    assert record.layers == ([1, 2] if algorithm == "memit" else [2])


def test_typing_in_a_filled_box_and_leaving_the_page_at_once_keeps_the_text(tiny_app):
    """The old-object and paraphrase boxes change key with every fill; what was typed into
    them reaches the other pages (Compare reads it) even when the next run is already
    another page's, and is still there on the way back."""
    at = app()
    labelled(at.text_area, "Paraphrases").set_value("Darrieux grew up speaking")
    labelled(at.text_input, "Old object").set_value("Klingon")
    at.switch_page("app_pages/compare.py").run()  # the typing arrives with the page switch
    assert not at.exception
    assert at.session_state["paraphrases"] == "Darrieux grew up speaking"
    assert at.session_state["target_true"] == "Klingon"
    at.switch_page("app_pages/edit.py").run()
    assert labelled(at.text_area, "Paraphrases").value == "Darrieux grew up speaking"
    assert labelled(at.text_input, "Old object").value == "Klingon"


@pytest.mark.parametrize("field, value, message", [
    ("prompt", "The mother tongue of Michel Rocard is", "does not occur in prompt"),
    ("target_new", "  ", "target_new is empty"),
    ("layers", "99", "out of range"),
    ("layers", "four", "write numbers like"),
])
def test_bad_input_gets_a_message_and_changes_nothing(tiny_app, field, value, message):
    at = app()
    if field == "layers":
        at.text_input(key=f"hp.{tiny_app['name']}.rome.layers").set_value(value)
    else:
        at.text_input(key=field).set_value(value)
    at.button(key="apply").click().run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert session_of(at, tiny_app).records == []
    assert same_weights(session_of(at, tiny_app).shared.loaded.model, tiny_app["weights"])


def test_two_browser_sessions_never_see_each_others_edits(tiny_app):
    a, b = app(), app()
    session_a, session_b = session_of(a, tiny_app), session_of(b, tiny_app)
    assert session_a.shared is session_b.shared and session_a is not session_b  # one model per process
    text = "The mother tongue of Danielle Darrieux is"

    def p_english(session) -> float:
        return session.run(lambda loaded: score_targets(loaded, [text], ["English"])[0].prob)

    original = p_english(session_b)
    apply_edit(a)
    after_a = p_english(session_a)
    assert after_a != original
    b.run()
    assert edits_in_sidebar(b).startswith("**0 edits**") and "edit_report" not in b.session_state
    assert p_english(session_b) == original
    assert session_b.run(lambda loaded: same_weights(loaded.model, tiny_app["weights"]))
    view_a = session_a.run(lambda loaded: weights_of(loaded.model))
    b.text_input(key="subject").set_value("Toko Yasuda")
    b.text_input(key="prompt").set_value("{} plays the")
    b.text_input(key="target_new").set_value("piano")
    b.run()
    labelled(b.text_input, "Old object").set_value("guitar")
    b.button(key="apply").click().run()
    assert not b.exception and len(session_b.records) == 1
    a.run()
    assert edits_in_sidebar(a).startswith("**1 edit**") and p_english(session_a) == after_a
    assert session_a.run(lambda loaded: same_weights(loaded.model, view_a))
    assert p_english(session_b) != after_a


def test_history_page_undo_reset_and_export(tiny_app, tmp_path):
    at = apply_edit(app())
    at.switch_page("app_pages/history.py").run()
    assert not at.exception
    assert len(at.dataframe[0].value) == 1 and "Danielle Darrieux" in at.dataframe[0].value["edit"][0]
    assert not [t for t in at.text_input if t.key == "export_dir"]  # no path for a visitor to type
    at.button(key="save_model").click().run()
    (saved,) = (tiny_app["root"] / "exports").iterdir()  # EMMET_EXPORT_DIR, named by the app
    assert any(saved.name in s.value for s in at.success) and saved.name.startswith("tiny-gpt2-1-edits-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    at.button(key="undo").click().run()
    assert any("Undone" in s.value for s in at.success) and session_of(at, tiny_app).records == []
    assert at.button(key="undo").disabled and at.button(key="reset").disabled
    at.switch_page("app_pages/edit.py").run()
    apply_edit(at)
    at.switch_page("app_pages/history.py").run()
    at.button(key="reset").click().run()
    assert len(session_of(at, tiny_app).records) == 1  # a reset asks first
    assert any("cannot be undone" in w.value for w in at.warning)
    at.button(key="reset_cancel").click().run()
    assert len(session_of(at, tiny_app).records) == 1 and not [b for b in at.button if b.key == "reset_confirm"]
    at.button(key="reset").click().run()
    at.button(key="reset_confirm").click().run()
    assert session_of(at, tiny_app).records == [] and not at.exception


def test_compare_page_runs_each_editor_from_the_original_weights(tiny_app):
    at = apply_edit(app())
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    assert at.multiselect(key="compare_facts").value[0].startswith("The fact on the Edit page")
    at.number_input(key="compare_gen_tokens").set_value(0)
    at.button(key="run_compare").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["editor"]) == ["unedited", "ROME", "MEMIT", "EMMET"]
    assert table["ES"].notna().all() and {"compare_scores", "compare_details", "compare_margins"} <= set(charts(at))
    assert table["‖Δ‖"].iloc[0] == "–" and not table.isin(["None"]).any().any()  # unedited: no update
    assert len(session_of(at, tiny_app).records) == 1  # the comparison kept nothing


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason="shared CounterFact data not present")
def test_compare_page_on_sampled_counterfact_facts_with_repeats(tiny_app):
    at = app().switch_page("app_pages/compare.py").run()
    at.radio(key="compare_source").set_value("Sample from CounterFact").run()
    at.number_input(key="compare_n").set_value(3)
    at.pills(key="compare_algorithms").set_value(["rome", "emmet"])
    at.number_input(key="compare_gen_tokens").set_value(0)
    at.number_input(key="compare_repeats").set_value(2)
    at.button(key="run_compare").click().run()
    assert not at.exception and not at.error
    run = at.session_state["compare_run"]
    assert run.seeds == [0, 1] and [[r.algorithm for r in rows] for rows in run.repeats] == [
        ["unedited", "rome", "emmet"]] * 2
    for rows in run.repeats:
        for row in rows:
            assert row.error is None and len(row.per_fact) == 3
            for metric in ("ES", "PS", "NS", "EM", "PM", "NM"):  # each mean is the mean of the facts
                assert row.metrics[metric] == pytest.approx(sum(f[metric] for f in row.per_fact) / 3)
    summary, per_fact = at.dataframe[0].value, at.dataframe[1].value
    assert list(summary["editor"]) == ["unedited", "ROME", "EMMET"] and not summary.isin(["None"]).any().any()
    es = [row.metrics["ES"] for row in run.rows_of("rome")]  # mean ± sample std over the two repeats
    assert summary["ES"].iloc[1] == f"{sum(es) / 2:.1f} ± {abs(es[0] - es[1]) / 2 ** 0.5:.1f}"
    assert len(per_fact) == 3 * 3 * 2
    margins = charts(at)["compare_margins"]["data"]
    assert margins[0]["name"] == "rewrite prompt" and len(margins[0]["y"]) == 3 * 3 * 2
    assert [b.label for b in at.get("download_button")] == [
        "Download everything (JSON)", "Download per-fact and mean rows (CSV)"]
    # What the two buttons hold (the page passes exactly these): every fact × editor × repeat.
    cases = {f["case_id"] for f in run.repeats[0][0].per_fact}
    lines = [line for line in csv.DictReader(io.StringIO(run.to_csv())) if line["row"] == "fact"]
    assert len(cases) == 3 and {(x["editor"], x["repeat"], x["case_id"]) for x in lines} == {
        (e, str(r), str(c)) for e in ("unedited", "rome", "emmet") for r in (1, 2) for c in cases}
    saved = json.loads(run.to_json())
    assert saved["facts"]["source"] == "Sample from CounterFact" and saved["facts"]["sampled"] == 3
    assert saved["model"] == tiny_app["name"] and saved["runs"][1]["rows"][2]["hparams"]["seed"] == 1
    assert sum(len(row["per_fact"]) for r in saved["runs"] for row in r["rows"]) == 3 * 3 * 2


@pytest.mark.parametrize("setup, message", [
    (lambda at: at.radio(key="compare_source").set_value("Upload a file"), "choose at least one fact"),
    (lambda at: at.pills(key="compare_algorithms").set_value([]), "choose at least one editor"),
    (lambda at: at.multiselect(key="compare_facts").set_value([]), "choose at least one fact"),
])
def test_compare_page_explains_what_is_missing(tiny_app, setup, message):
    at = app().switch_page("app_pages/compare.py").run()
    setup(at)
    at.run().button(key="run_compare").click().run()
    assert not at.exception and [e.value for e in at.error] == [f"The comparison: {message}"]
    assert "compare_run" not in at.session_state and not at.get("plotly_chart")


def test_compare_page_explains_a_bad_file(tiny_app):
    at = app().switch_page("app_pages/compare.py").run()
    at.radio(key="compare_source").set_value("Upload a file").run()
    at.file_uploader(key="compare_file").set_value(("facts.json", b"[{", "application/json"))
    at.run().button(key="run_compare").click().run()
    assert not at.exception and at.error[0].value.startswith("Reading facts.json")
    assert any("not valid JSON" in e.value for e in at.error) and "compare_run" not in at.session_state


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.radio(key="batch_source").set_value("Upload a file").run()
    at.file_uploader(key="batch_file").set_value((name, data, "text/csv"))
    return at.run()


def test_batch_page_with_an_uploaded_file(tiny_app):
    at = app().switch_page("app_pages/batch.py").run()
    upload(at, "facts.csv", CSV.encode())
    assert not at.exception and any("2 facts read" in s.value for s in at.success)
    at.button(key="run_batch").click().run()
    assert not at.exception and not at.error
    assert {"batch_summary", "batch_success"} <= set(charts(at))
    assert [r["prompt"] for r in at.dataframe[0].value.to_dict("records")] == [
        "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"]
    records = session_of(at, tiny_app).records
    assert len(records) == 1 and records[0].label == "EMMET batch of 2 facts"
    # Every mark carries its margin, and the marks agree with the metrics and the threshold.
    report = at.session_state["batch_report"][1]
    rows = at.dataframe[0].value.to_dict("records")
    margin = at.session_state["clear_margin"]
    for row, after, before in zip(rows, report.after, report.before):
        verdict = row["ES"].split(" → ")[1]
        assert (after["ES"] == 1.0) == (after["ES_margin"] > 0)
        assert ("✗" in verdict) == (after["ES_margin"] <= 0)
        assert ("✓?" in verdict) == (0 < after["ES_margin"] < margin)
        assert row["known before"] == ("yes" if before["ES"] == 1.0 else "")


@pytest.mark.parametrize("name, data, message", [
    ("facts.csv", "subject,prompt,target_new\nGödel,{} spoke,English\n".encode("latin-1"), "not UTF-8"),
    ("facts.csv", b"name,question\nA,B\n", "lacks the column(s) subject, prompt, target_new"),
    ("facts.json", b"[{", "not valid JSON"),
])
def test_batch_page_explains_a_bad_file(tiny_app, name, data, message):
    at = app().switch_page("app_pages/batch.py").run()
    upload(at, name, data)
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="run_batch").disabled


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason="shared CounterFact data not present")
def test_batch_page_samples_counterfact(tiny_app):
    at = app().switch_page("app_pages/batch.py").run()
    at.number_input(key="batch_n").set_value(3)
    at.segmented_control(key="batch_algorithm").set_value("memit")
    at.button(key="run_batch").click().run()
    assert not at.exception and not at.error
    assert session_of(at, tiny_app).records[0].label == "MEMIT batch of 3 facts"
    assert len(at.dataframe[0].value) == 3


def test_learn_page_before_and_after_an_edit(tiny_app):
    at = app().switch_page("app_pages/learn.py").run()
    assert not at.exception and len(at.latex) >= 5
    assert any("Apply an edit" in i.value for i in at.info)
    at.switch_page("app_pages/edit.py").run()
    apply_edit(at)
    at.switch_page("app_pages/learn.py").run()
    assert not at.exception
    assert {"learn_keys", "learn_residuals", "learn_singular", "learn_residual_norms", "learn_spectrum"} <= set(
        charts(at))
    assert any("numerical rank **1**" in m.value for m in at.markdown)


def test_a_model_that_cannot_load_gets_a_message(tiny_app, tmp_path):
    at = app()
    at.selectbox(key="model_choice").set_value("Other: a hub id or a local path").run()
    at.text_input(key="model_other").set_value(str(tmp_path / "no-such-model")).run()
    assert not at.exception
    assert any("cannot load model" in e.value for e in at.sidebar.error), [e.value for e in at.sidebar.error]
    assert any("Choose a model" in i.value for i in at.info)
    at.text_input(key="model_other").set_value(tiny_app["name"]).run()
    assert not at.exception and at.button(key="apply")


def test_placement_spreads_the_model_with_accelerate(tiny_app):
    """The sidebar's placement: "all GPUs" loads through accelerate's device_map="auto"
    (on a machine without a GPU it places everything on the CPU) and edits work there."""
    at = app()
    assert at.selectbox(key="placement").value == "one device"
    at.selectbox(key="placement").set_value("all GPUs (device_map=auto)").run()
    assert not at.exception and not at.sidebar.error
    apply_edit(at)
    assert not at.exception and not at.error
    session = session_of(at, tiny_app)
    assert len(session.records) == 1
    assert same_weights(session.shared.loaded.model, tiny_app["weights"])


def test_a_failed_save_is_one_message_without_server_details(tiny_app, monkeypatch):
    at = apply_edit(app())
    blocker = tiny_app["root"] / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("EMMET_EXPORT_DIR", str(blocker / "exports"))  # cannot be a folder
    at.switch_page("app_pages/history.py").run()
    at.button(key="save_model").click().run()
    assert not at.exception and len(at.error) == 1
    assert "cannot write to the export folder" in at.error[0].value and "Traceback" not in at.error[0].value
    assert not at.expander or all("bug report" not in e.label for e in at.expander)


def test_a_shared_server_offers_only_its_configured_models(tiny_app, monkeypatch):
    monkeypatch.setenv("EMMET_MODELS", tiny_app["name"])
    at = app()
    assert at.selectbox(key="model_choice").options == [tiny_app["name"]]
    assert not [t for t in at.text_input if t.key == "model_other"]  # no path for a visitor to type
    assert not at.exception and session_of(at, tiny_app).loaded.name == tiny_app["name"]


def test_lifelong_page_steps_runs_and_stops(tiny_app):
    """A new run, one step (the unedited checkpoint arrives), stop (what was measured stays);
    then a run to the end: charts and texts of both editors, and a download."""
    at = app()
    at.switch_page("app_pages/lifelong.py").run()
    assert not at.exception
    at.number_input(key="lifelong_n").set_value(4)
    at.number_input(key="lifelong_batch").set_value(2)
    at.number_input(key="lifelong_every").set_value(2)
    at.button(key="lifelong_start").click().run()
    _, run = at.session_state["lifelong"]
    assert run.status == "ready" and not any(lane.curves for lane in run.lanes)
    at.button(key="lifelong_step").click().run()
    assert run.status == "paused" and [c["edits"] for c in run.lanes[0].curves] == [0]  # a checkpoint arrived
    assert "lifelong_chart" in charts(at)
    at.button(key="lifelong_stop").click().run()
    assert run.status == "stopped" and run.lanes[0].curves and at.button(key="lifelong_run").disabled
    assert at.get("download_button")  # what it measured can be downloaded

    at.button(key="lifelong_start").click().run()
    _, run = at.session_state["lifelong"]
    at.button(key="lifelong_run").click().run()  # runs to the end (the page reruns itself after each step)
    assert not at.exception and not at.error
    assert run.status == "done" and [lane.algorithm for lane in run.lanes] == ["memit", "encore"]
    assert all([c["edits"] for c in lane.curves] == [0, 2, 4] for lane in run.lanes)
    texts = at.dataframe[0].value
    assert list(texts["facts edited"]) == [0, 2, 4] and set(texts.columns) >= {"MEMIT", "ENCORE"}
    session = session_of(at, tiny_app)
    assert session.records == [] and same_weights(session.shared.loaded.model, tiny_app["weights"])


def test_settings_stay_chosen_across_pages(tiny_app):
    """The lecturer picks EMMET, 20 tokens and layer 1, visits History and comes back."""
    at = app()
    at.segmented_control(key="algorithm").set_value("emmet").run()
    layers_key = f"hp.{tiny_app['name']}.emmet.layers"
    at.number_input(key="gen_tokens").set_value(20)
    at.text_input(key=layers_key).set_value("1")
    at.number_input(key="clear_margin").set_value(0.5).run()
    for page in ("app_pages/history.py", "app_pages/compare.py", "app_pages/edit.py"):
        at.switch_page(page).run()
        assert not at.exception
    assert at.segmented_control(key="algorithm").value == "emmet"
    assert at.number_input(key="gen_tokens").value == 20
    assert at.text_input(key=layers_key).value == "1"
    assert at.number_input(key="clear_margin").value == 0.5
    assert at.button(key="apply").label == "Apply edit with EMMET"


@pytest.mark.parametrize("field, value, message", [
    ("prompt", "The mother tongue of {} is " + "very " * 1000, "characters long; at most 300"),
    ("target_new", "English " * 30, "the new object is 239 characters long; at most 80"),
    ("paraphrases", "\n".join(f"Darrieux speaks {i}" for i in range(12)), "12 paraphrases; at most 10"),
])
def test_over_long_inputs_get_a_short_message_and_hold_nothing(tiny_app, field, value, message):
    at = app()
    box = labelled(at.text_area, "Paraphrases") if field == "paraphrases" else at.text_input(key=field)
    box.set_value(value)
    at.button(key="apply").click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert message in error and len(error) < 300  # the input is never echoed whole
    assert session_of(at, tiny_app).records == []


def test_ties_margins_and_known_facts_on_the_edit_page(tiny_app):
    """The neighbour whose object is the new object is a tie ('='), never 'kept'; every
    mark carries its margin; a fact the model already answers the new way is flagged."""
    at = app()
    labelled(at.text_area, "Neighbours").set_value("The mother tongue of Jean Gabin is | English\n"
                                                   "The mother tongue of Michel Rocard is | French")
    apply_edit(at)
    assert not at.exception and not at.error
    report = at.session_state["edit_report"][1]
    assert report.neighbours_kept <= 1  # the tie never counts as kept
    (table,) = [d.value for d in at.dataframe]
    results = list(table["result"])
    assert "= same object" in results
    assert all(r[0] in "✓✗=" and (r.startswith("=") or r.split()[-1][0] in "+-") for r in results)
    kept = next(m for m in at.metric if m.label == "Neighbours kept")
    assert kept.value.endswith("/ 2")
    # Now the same fact with the new object being what the model already says.
    at.text_input(key="target_new").set_value(report.after.rewrite.new)
    labelled(at.text_input, "Old object").set_value("Klingon")
    at.button(key="apply").click().run()
    assert not at.exception
    now = at.session_state["edit_report"][1]
    assert now.already_new == now.before.rewrite.as_new().passed
    assert any("already preferred" in w.value for w in at.warning) == now.already_new


def test_lecture_mode_writes_texts_only_when_asked(tiny_app):
    at = app()
    at.session_state["lecture_mode"] = True
    apply_edit(at)
    assert not at.exception
    report = at.session_state["edit_report"][1]
    assert report.texts_pending and "chart_entropy" not in charts(at)
    assert {"chart_prompt", "chart_paraphrases"} <= set(charts(at))  # the answer comes first
    at.button(key="write_texts").click().run()
    assert not report.texts_pending and len(report.after.texts) == len(report.generation_prompts) == 2
    assert "chart_entropy" in charts(at) and report.seconds["texts"] > 0
    assert report.total_seconds == pytest.approx(sum(report.seconds.values()))


# -- lecture mode, the ask box and explanations (issue 13) ------------------------------------
def ask_tables(at: AppTest) -> tuple[list[dict], list[dict]]:
    """The ask box's two tables (original, this session's): the last two on the page."""
    original, mine = at.dataframe[-2:]
    return original.value.to_dict("records"), mine.value.to_dict("records")


def test_history_page_asks_the_original_and_the_edited_model(tiny_app):
    from emmet_core.readout import top_next_tokens
    from emmet_core.request import EditRequest

    at = app().switch_page("app_pages/history.py").run()
    prompt = "The mother tongue of Danielle Darrieux is"
    at.text_input(key="history_ask").set_value(prompt).run()
    assert not at.exception and not at.error
    original, mine = ask_tables(at)
    assert len(original) == 5 and original == mine  # no edits yet: the same model
    assert any(m.value == "**This session's model (0 edits)**" for m in at.markdown)
    session = session_of(at, tiny_app)
    session.edit([EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")], "rome")
    at.run()
    assert not at.exception and not at.error
    after_original, after_mine = ask_tables(at)
    assert after_original == original and after_mine != original  # the original column is unchanged
    assert any(m.value == "**This session's model (1 edit)**" for m in at.markdown)
    expected = session.run(lambda loaded: top_next_tokens(loaded, prompt))
    assert [row["P"] for row in after_mine] == [
        f"{p:.1%}" if p >= 0.001 else f"{p:.1e}" for _, p in expected]
    assert at.dataframe[0].value["P(new) before → after"][0] == "–"  # not read by the Edit page: a dash
    at.text_input(key="history_ask").set_value("secret, " * 44 + "end").run()
    assert not at.exception and len(at.text_input(key="history_ask").value) == 300  # the box takes 300 characters
    assert [e.value for e in at.error] == [  # the tiny model's context is 128 tokens; the input is not echoed
        "Asking the model: the prompt is 226 tokens long, more than the model's context of 128"]


def test_lecture_mode_prepares_the_examples_and_enlarges_the_charts(tiny_app):
    from emmet_core.request import EditRequest

    at = app()
    assert not at.get("html") and not [b for b in at.sidebar.button if b.key == "prepare_examples"]
    at.toggle(key="lecture_mode").set_value(True).run()
    assert not at.exception and "font-size" in at.get("html")[0].proto.body  # the projector CSS
    at.button(key="prepare_examples").click().run()
    assert not at.exception and not at.error
    prepared = at.session_state["prepared"][tiny_app["name"]]
    assert list(prepared) == ["rome"] and prepared["rome"].facts == 6
    assert any(c.value.startswith("Prepared: ROME (6 facts") for c in at.sidebar.caption)
    assert len(list((tiny_app["root"] / "cache" / "values").rglob("*.safetensors"))) >= 6
    session = session_of(at, tiny_app)
    example = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    record = session.edit([example], "rome", cache_values=True, refuse_current=False).record
    assert record.values_cached == 1  # v* of the prepared example, read from the cache
    at.switch_page("app_pages/learn.py").run()
    assert not at.exception and at.toggle(key="lecture_mode").value  # the switch holds across pages
    shown = charts(at)
    assert shown["learn_keys"]["layout"]["font"]["size"] == 18 and shown["learn_spectrum"]["layout"]["height"] == 450
    assert sum(c.value.startswith("**Good:**") for c in at.caption) == 5  # one under each chart
    assert any("covariance weight" in m.value and "mom2_update_weight" in m.value for m in at.markdown)


def test_batch_and_lifelong_pages_say_what_the_editors_do(tiny_app):
    at = app().switch_page("app_pages/batch.py").run()
    assert not at.exception
    captions = [c.value for c in at.caption]
    assert any(c.startswith("EMMET writes a batch") and c.endswith("see the Learn page.") for c in captions)
    assert [link.proto.page for link in at.get("page_link")] and "learn" in at.get("page_link")[0].proto.page
    at.switch_page("app_pages/lifelong.py").run()
    captions = [c.value for c in at.caption]
    assert any(c.startswith("MEMIT writes") for c in captions)
    assert any(c.startswith("ENCORE is MEMIT") for c in captions)


def test_compare_applies_the_edit_pages_length_caps(tiny_app):
    at = app()
    at.text_input(key="prompt").set_value("The mother tongue of {} is " + "very " * 100)
    at.run()
    at.switch_page("app_pages/compare.py").run()
    at.button(key="run_compare").click().run()
    assert not at.exception
    assert any("characters long; at most 300" in e.value for e in at.error), [e.value for e in at.error]
