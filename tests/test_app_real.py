"""The Edit page on the real default model (SmolLM2-135M, offline), through AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import labelled
from streamlit.testing.v1 import AppTest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


def test_rome_moves_darrieux_to_english_and_keeps_her_neighbours(monkeypatch):
    monkeypatch.delenv("EMMET_MODEL", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=900).run()
    assert not at.exception
    assert labelled(at.text_input, "Old object").value == "French"  # the model's own answer
    at.number_input(key="gen_tokens").set_value(20)
    at.button(key="apply").click().run()
    assert not at.exception and not at.error
    report = at.session_state["edit_report"][1]
    assert report.before.rewrite.p_true > report.before.rewrite.p_new
    assert report.after.rewrite.p_new > 0.5 > report.after.rewrite.p_true
    assert report.paraphrases_passed >= 2 and report.neighbours_kept >= 2
    assert report.record.layers == [4] and 1 < report.record.norms[4] < 100
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Paraphrases passed"] == f"{report.paraphrases_passed} / 3"
    assert labelled(at.text_input, "Old object").value != "French"  # after the edit the model says otherwise
