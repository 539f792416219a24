"""`emmet eval` end to end on a few records of the shared CounterFact with the real
default model: summary and per-record files, pre beside post, resume, the plot."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import SHARED_DATA

from emmet_core.cli import main

pytestmark = pytest.mark.slow

DATA = str(SHARED_DATA / "counterfact" / "counterfact-edit.json")


def test_eval_emmet_batches_resume_and_plot(device, tmp_path, capsys):
    out = tmp_path / "emmet-b5"
    args = ["eval", "--model", "smollm2-135m", "--device", device, "--algo", "emmet", "--data", DATA, "--n", "10",
            "--batch-size", "5", "--gen-tokens", "20", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 10 and summary["batch_size"] == 5 and summary["algorithm"] == "emmet"
    for key in ("ES", "PS", "NS", "EM", "PM", "NM", "GE", "S"):
        assert key in summary["pre"] and key in summary["post"]
    assert summary["post"]["ES"] > summary["pre"]["ES"]  # the edits took
    assert summary["post"]["ES"] >= 80
    assert {"hparams", "seed", "versions", "model_fingerprint", "seconds"} <= set(summary)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert summary["versions"]["emmet-studio-git"].split("+")[0] == head  # the code that produced it
    assert summary["complete"] is True and summary["n_planned"] == 10 and not (out / "progress.json").exists()
    lines = (out / "records.jsonl").read_text().splitlines()
    source = json.loads(open(DATA).read())[:10]
    assert [json.loads(x)["case_id"] for x in lines] == [r["case_id"] for r in source]

    # interrupted after the first chunk: the second is redone, the first kept as it was
    (out / "records.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    assert main(args) == 0
    resumed = (out / "records.jsonl").read_text().splitlines()
    assert len(resumed) == 10 and resumed[:5] == lines[:5]
    assert json.loads((out / "summary.json").read_text())["post"]["ES"] == pytest.approx(summary["post"]["ES"])

    # Pre-edit scores are those of the unedited model whatever the batch size (GE texts are
    # seeded per prompt, not per batch); the second run takes them from the baseline cache.
    other = tmp_path / "emmet-b10"
    assert main([*args[:-6], "--batch-size", "10", "--gen-tokens", "20", "--out", str(other)]) == 0
    first = {row["case_id"]: row for row in map(json.loads, lines)}
    for row in map(json.loads, (other / "records.jsonl").read_text().splitlines()):
        assert row["pre"] == first[row["case_id"]]["pre"]

    capsys.readouterr()
    assert main(["eval", "--plot", str(out), "--out", str(tmp_path / "plot")]) == 0
    assert (tmp_path / "plot" / "batch_sizes.html").stat().st_size > 10_000
    table = (tmp_path / "plot" / "table.md").read_text().splitlines()
    assert table[2].startswith("| unedited | 10 |") and table[3].startswith("| EMMET batch 5 | 10 |")
    assert f"{summary['post']['ES']:.1f}" in table[3]


def test_eval_rome_sequential_and_bad_data(device, tmp_path):
    out = tmp_path / "rome-seq"
    assert main(["eval", "--algo", "rome", "--device", device, "--data", DATA, "--n", "2", "--offset", "3",
                 "--sequential", "--gen-tokens", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequential"] is True and summary["n"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "subject": "y", "target_new": "a", "ground_truth": "b",
                                "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "b"}]))
    assert main(["eval", "--data", str(bad), "--out", str(tmp_path / "bad")]) == 2
