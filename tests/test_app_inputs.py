"""What the app reads from people and files: suggestions, uploads, text boxes, figures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA

from emmet_core.errors import InvalidRequestError
from emmet_core.hparams import parse_layers
from emmet_core.studio import figures
from emmet_core.studio.anatomy import numerical_rank, picture, spectrum
from emmet_core.studio.comparison import CompareRun, Tracker, fact_table, summary_table
from emmet_core.studio.judge import CLEAR_MARGIN
from emmet_core.studio.suggest import RelationIndex, generic_paraphrases, suggest
from emmet_core.studio.uploads import UploadError, parse_upload
from emmet_core.studio.workflows import CompareRow, PromptScore, format_neighbours, parse_lines, parse_neighbours


def mend(case, subject, prompt, new, true, rephrase, locality, locality_true):
    return {"case_id": case, "subject": subject, "prompt": prompt, "target_new": new, "ground_truth": true,
            "rephrase_prompt": rephrase, "locality_prompt": locality, "locality_ground_truth": locality_true}


# Hand-written records in the MEND layout: two wordings of "native language" linked by a
# neighbourhood prompt, and an unrelated relation.
RECORDS = [
    mend(0, "Ada Lovelace", "The mother tongue of Ada Lovelace is", "French", "English",
         "Ada Lovelace grew up speaking", "Charles Babbage is a native speaker of", "English"),
    mend(1, "Charles Babbage", "Charles Babbage is a native speaker of", "German", "English",
         "Charles Babbage speaks", "The mother tongue of Alan Turing is", "English"),
    mend(2, "Alan Turing", "The mother tongue of Alan Turing is", "Dutch", "English",
         "Alan Turing was raised speaking", "The mother tongue of Ada Lovelace is", "English"),
    mend(3, "Marie Curie", "The mother tongue of Marie Curie is", "Spanish", "Polish",
         "Marie Curie grew up speaking", "The mother tongue of Alan Turing is", "English"),
    mend(4, "Paris", "Paris is the capital of", "Italy", "France",
         "The city of Paris is the capital of", "Berlin is the capital of", "Germany"),
]


def test_relations_are_recovered_from_neighbourhood_prompts():
    index = RelationIndex.from_records(RECORDS)
    assert index.relation["The mother tongue of {} is"] == index.relation["{} is a native speaker of"]
    assert index.relation["{} is the capital of"] != index.relation["The mother tongue of {} is"]
    paraphrases = index.suggest_paraphrases("Ada Lovelace", "The mother tongue of {} is", k=3)
    assert paraphrases[0] == "Ada Lovelace grew up speaking"  # the record's own paraphrase first
    assert "Ada Lovelace is a native speaker of" in paraphrases  # the relation's other wording
    assert "The mother tongue of Ada Lovelace is" not in paraphrases
    neighbours = index.suggest_neighbours("Ada Lovelace", "The mother tongue of {} is", "English", k=3)
    # Same old object first, same wording first; every neighbour in the user's wording.
    assert neighbours == [("The mother tongue of Alan Turing is", "English"),
                          ("The mother tongue of Charles Babbage is", "English"),
                          ("The mother tongue of Marie Curie is", "Polish")]


def test_suggestions_without_data_are_generic_and_never_empty():
    paraphrases, neighbours = suggest(None, "Ada Lovelace", "The mother tongue of {} is")
    assert paraphrases == generic_paraphrases("The mother tongue of Ada Lovelace is")[:4] and neighbours == []
    assert RelationIndex.load(None) is None


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason="shared CounterFact data not present")
def test_suggestions_from_the_shared_counterfact_files():
    index = RelationIndex.load(SHARED_DATA)
    paraphrases, neighbours = suggest(index, "Danielle Darrieux", "The mother tongue of {} is", "French")
    assert "Where Danielle Darrieux is from, people speak the language of" in paraphrases
    assert len(neighbours) == 5 and all(target == "French" for _, target in neighbours)


def test_text_boxes_and_layers():
    assert parse_lines(" a \n\n b\n") == ["a", "b"]
    neighbours = parse_neighbours("Jean Gabin speaks | French\nMichel Rocard speaks\n  \n")
    assert neighbours == [("Jean Gabin speaks", "French"), ("Michel Rocard speaks", None)]
    assert parse_neighbours(format_neighbours(neighbours)) == neighbours
    assert parse_layers("4") == (4,) and parse_layers("2-4, 7") == (2, 3, 4, 7) and parse_layers("3,2,3") == (2, 3)
    for bad in ("", "four", "5-2", "1-"):
        with pytest.raises(InvalidRequestError, match="layers"):
            parse_layers(bad)


CSV = ("subject,prompt,target_new,target_true,paraphrase,neighbour_prompt,neighbour_target\n"
       "Ada Lovelace,The mother tongue of {} is,French,English,Ada Lovelace grew up speaking,"
       "The mother tongue of Alan Turing is,English\n"
       "Paris,Paris is the capital of,Italy,,,,\n")


def test_csv_upload_with_optional_columns():
    upload = parse_upload("facts.csv", CSV.encode())
    assert len(upload.records) == 2 and not upload.skipped
    first, second = upload.records
    assert first.request.text == "The mother tongue of Ada Lovelace is" and first.request.target_true == "English"
    assert first.paraphrase_prompts == ["Ada Lovelace grew up speaking"]
    assert first.neighborhood_prompts == ["The mother tongue of Alan Turing is"]
    assert second.request.target_true is None and second.neighborhood_prompts == []


def test_json_uploads_in_both_counterfact_layouts():
    upload = parse_upload("cf.json", json.dumps(RECORDS).encode())  # MEND layout names are aliases
    assert len(upload.records) == 5 and upload.records[0].request.target_true == "English"
    assert upload.records[0].neighborhood_targets == ["English"]
    rome = [{"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Ada Lovelace",
                                                 "target_new": {"str": "French"}, "target_true": {"str": "English"}},
             "paraphrase_prompts": ["Ada Lovelace grew up speaking"], "neighborhood_prompts": []}]
    assert parse_upload("rome.json", json.dumps(rome).encode()).records[0].case_id == 7
    lines = "\n".join(json.dumps(r) for r in RECORDS[:2])
    assert len(parse_upload("facts.jsonl", lines.encode()).records) == 2


@pytest.mark.parametrize("name, data, message", [
    ("facts.txt", b"subject,prompt,target_new\n", "upload a .csv, .json or .jsonl"),
    ("facts.csv", b"", "is empty"),
    ("facts.csv", "subject,prompt,target_new\nDarrieux,Le français de {} est,Anglais\n".encode("utf-16"),
     "not UTF-8"),
    ("facts.csv", "subject,prompt,target_new\nGödel,{} spoke,English\n".encode("latin-1"), "not UTF-8"),
    ("facts.csv", b"name,question,answer\nA,B,C\n", "lacks the column(s) subject, prompt, target_new"),
    ("facts.csv", b"subject,prompt,target_new\n", "header but no facts"),
    ("facts.json", b'[{"subject": "A",', "not valid JSON"),
    ("facts.json", b'{"facts": 3}', "non-empty list"),
    ("facts.csv", b"subject,prompt,target_new\nAda,Bob is a,cat\n", "no usable facts"),
])
def test_bad_uploads_get_a_readable_message(name, data, message):
    with pytest.raises(UploadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_upload(name, data)


def test_upload_limits_and_skipped_rows():
    with pytest.raises(UploadError, match=r"limit is 0\.0 MB"):
        parse_upload("facts.csv", CSV.encode(), max_bytes=10)
    with pytest.raises(UploadError, match="at most 1 are edited"):
        parse_upload("facts.csv", CSV.encode(), max_facts=1)
    mixed = CSV + "Bob,{} likes,\nCarl,Someone else likes,tea\n"
    upload = parse_upload("facts.csv", mixed.encode())
    assert len(upload.records) == 2
    assert upload.skipped[0].startswith("line 4: empty target_new") and "does not occur" in upload.skipped[1]


def probes(p_new: list[float], p_true: list[float]) -> list[PromptScore]:
    import math

    return [PromptScore(f"prompt {i}", "new", "old", a, b, -math.log(a), -math.log(b))
            for i, (a, b) in enumerate(zip(p_new, p_true))]


def test_figures_carry_the_numbers():
    before, after = probes([0.03, 0.1], [0.2, 0.3]), probes([0.99, 0.6], [0.001, 0.4])
    prompt = figures.prompt_chart(before[0], after[0])
    assert [list(t.y) for t in prompt.data] == [[0.03, 0.99], [0.2, 0.001]]
    paraphrases = figures.paraphrase_chart(before, after)
    titles = [a.text for a in paraphrases.layout.annotations]
    assert len(paraphrases.data) == 4 and titles[0].startswith("✓ +6.90 prompt 0")  # ln(0.99 / 0.001)
    assert titles[1].startswith("✓? +0.41 prompt 1")  # 0.6 vs 0.4: a win, but by less than the clear margin
    assert figures.paraphrase_chart(before, after, threshold=0.4).layout.annotations[1].text.startswith("✓ +0.41")
    neighbours = figures.neighbour_chart(before, after)
    assert [t.x for t in neighbours.data] == [(0.2,), (0.001,), (0.3,), (0.4,)]
    assert figures.phase_chart({"values": 6.0, "keys": 0.1, "total": 6.2}).data[0].y == ("keys", "values")
    rows = [CompareRow("unedited", {"ES": 0.0, "S": 0.0}), CompareRow("rome", {"ES": 100.0, "S": 100.0},
                                                                        [0.9], [0.01], {4: 3.0}, {"total": 2.0}),
            CompareRow("memit", error="refused")]
    scores = figures.compare_scores_chart(rows)
    assert [t.name for t in scores.data] == ["unedited", "ROME"]  # the failed editor has no bars
    assert figures.compare_details_chart(rows).data[3].y == (3.0,)


def test_margin_chart_per_editor_with_the_clear_margin_line():
    facts = [{"editor": "unedited", "repeat": 1, "case_id": 7, "prompt": "p0", "ES_margin": -1.5,
              "PS_margin": -0.5, "NS_margin": 2.0},
             {"editor": "rome", "repeat": 1, "case_id": 7, "prompt": "p0", "ES_margin": 3.0,
              "PS_margin": 0.4},
             {"editor": "rome", "repeat": 2, "case_id": 7, "prompt": "p0", "ES_margin": 2.5},
             {"editor": "memit", "repeat": 1, "case_id": 7, "prompt": "p0", "error": "refused"}]
    chart = figures.margin_chart(facts, threshold=0.5)
    assert [t.name for t in chart.data] == ["rewrite prompt", "paraphrases (mean)", "neighbours (mean, own object)"]
    assert chart.data[0].x == ("unedited", "ROME", "ROME") and chart.data[0].y == (-1.5, 3.0, 2.5)
    assert chart.data[1].y == (-0.5, 0.4) and chart.data[2].y == (2.0,)  # missing margins are left out
    assert chart.data[0].text[2] == "case 7 · repeat 2: p0"
    assert [(s.y0, s.y1) for s in chart.layout.shapes] == [(0, 0), (0.5, 0.5)]
    assert chart.layout.annotations[0].text == "clear margin 0.5 nats"
    assert figures.margin_chart(facts).layout.shapes[1].y0 == CLEAR_MARGIN


def fact(case: int, es: float, margin: float, judgement: str) -> dict:
    return {"case_id": case, "prompt": f"prompt {case}", "target_new": "new", "target_true": "old", "ES": es,
            "ES_margin": margin, "judgement": judgement, "p_new": 0.5, "p_true": 0.1}


def test_comparison_tables_show_mean_and_spread_and_never_none():
    def rows(es: float, norm: float) -> list[CompareRow]:
        return [CompareRow("unedited", {"ES": 0.0}, [0.1, 0.2], [0.5, 0.4],
                           per_fact=[fact(0, 0.0, -1.0, "fail"), fact(1, 0.0, -2.0, "fail")]),
                CompareRow("rome", {"ES": es}, [0.9, 0.8], [0.1, 0.1], {3: norm}, {"total": 2.0}, [3],
                           per_fact=[fact(0, 100.0, 2.5, "pass"), fact(1, es * 2 - 100, 0.3, "weak")]),
                CompareRow("memit", error="refused")]
    run = CompareRun("tiny", ["rome", "memit"], [0, 1], [rows(100.0, 3.0), rows(50.0, 5.0)])
    summary = {row["editor"]: row for row in summary_table(run)}
    assert summary["ROME"]["ES"] == "75.0 ± 35.4" and summary["ROME"]["‖Δ‖"] == "4 ± 1.41"
    assert summary["ROME"]["‖Δ‖ by layer"] == "3: 4" and summary["ROME"]["margin"] == "+1.40 ± 0.00"
    assert summary["unedited"]["‖Δ‖"] == summary["unedited"]["seconds"] == summary["unedited"]["layers"] == "–"
    assert summary["MEMIT"]["ES"] == "–" and summary["MEMIT"]["note"] == "refused"
    assert not any(value is None or "None" in value for row in summary.values() for value in row.values())
    table = fact_table(run)
    assert len(table) == 2 * 3 * 2 and table[2]["rewrite"] == "✓ +2.50" and table[3]["rewrite"] == "✓? +0.30"
    assert table[4]["note"] == "refused" and table[4]["rewrite"] == table[4]["ES"] == "–"
    relabelled = [row["rewrite"] for row in fact_table(run, threshold=0.2)][:4]
    assert relabelled == ["✗ -1.00", "✗ -2.00", "✓ +2.50", "✓ +0.30"]  # the margin judged against another line
    assert not any(value is None or "None" in value for row in table for value in row.values())
    means = run.mean_rows()
    assert means[1].metrics["ES"] == 75.0 and means[1].norms == {3: 4.0} and means[2].error == "refused"
    single = CompareRun("tiny", ["rome", "memit"], [0], [rows(100.0, 3.0)])
    assert summary_table(single)[1]["ES"] == "100.0"  # one repeat: no spread to show


def test_progress_text_follows_repeats_editors_and_rome_facts():
    tracker = Tracker(["rome", "emmet"], repeats=2, facts=3, seed=5)
    tracker.on_step("unedited")
    assert tracker.text() == "Repeat 1 of 2 (seed 5) · **reading the unedited model** on 3 facts"
    assert tracker.span == (0.0, 1 / 6)
    tracker.on_step("rome")
    for phase in ("prepare", "keys", "values", "solve", "keys"):
        tracker.on_phase(phase)
    assert tracker.text().endswith("**ROME** (editor 1 of 2) · fact 2 of 3")
    tracker.on_step("emmet")
    tracker.on_phase("keys")
    assert tracker.text().endswith("**EMMET** (editor 2 of 2) · all 3 facts in one solve")
    tracker.on_step("unedited")
    assert tracker.text().startswith("Repeat 2 of 2 (seed 6)") and tracker.span == (0.5, 4 / 6)


def test_anatomy_of_a_rank_one_update():
    torch.manual_seed(0)
    key, residual = torch.randn(6, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    delta = residual @ key.T / (key.T @ key)  # ROME with C0 = I: Δ k = r exactly
    shot = picture("test", 3, key, residual, delta)
    assert shot.rank == 1 and shot.singular_values.shape == (4,)
    assert float(shot.residual_after[0]) < 1e-10 < float(shot.residual_before[0])
    assert numerical_rank(torch.tensor([3.0, 2.0, 1e-9])) == 2
    values = spectrum(torch.diag(torch.tensor([1.0, 5.0, 3.0])))
    assert values.tolist() == [5.0, 3.0, 1.0]


def test_the_server_refuses_uploads_above_the_parsers_limit():
    """Streamlit enforces server.maxUploadSize before the page sees the bytes; it must not
    let through more than the parser accepts (and the Docker image copies this config)."""
    import re
    from pathlib import Path

    from emmet_core.studio.uploads import MAX_BYTES

    config = (Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml").read_text()
    server = config.split("[server]", 1)[1].split("\n[", 1)[0]
    megabytes = int(re.search(r"^maxUploadSize\s*=\s*(\d+)", server, re.MULTILINE).group(1))
    assert 0 < megabytes * 2**20 <= MAX_BYTES
