"""Every bad input to the command line is one readable line and a non-zero exit.

The table holds the inputs a reliability run found ending in a Python traceback (or
exiting 0) plus the checks that need no model. The model is a tiny Llama saved to disk
and opened by path, as a user's local model is.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORPUS, make_model, make_tokenizer

from emmet_core.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer("sp")
    make_model("llama", len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text("\n\n".join(CORPUS * 8), encoding="utf-8")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "plain.txt").write_text("not json at all", encoding="utf-8")
    (root / "table.csv").write_text("subject,prompt,target_new\nA,{} is,B\n", encoding="utf-8")
    (root / "data.json").write_text(json.dumps([{
        "case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
        "locality_prompt": "Michel Rocard speaks", "locality_ground_truth": "French"}]), encoding="utf-8")
    for name, payload in {
        "subj.json": [{"prompt": "{} is", "subj": "Berlin", "target_new": "Rome"}],
        "paraphrase.json": [{"prompt": "{} is", "subject": "Berlin", "target_new": "Rome", "paraphrase": "x"}],
        "number.json": [{"prompt": "{} is", "subject": "Berlin", "target_new": 5}],
        "same_key.json": [{"prompt": "{} is the capital of", "subject": "Berlin", "target_new": "Italy"},
                          {"prompt": "{} is in", "subject": "Berlin", "target_new": "Spain"}],
    }.items():
        (root / name).write_text(json.dumps(payload), encoding="utf-8")
    return root


def edit(files, *extra: str) -> list[str]:
    return ["edit", "--model", str(files / "model"), "--device", "cpu", "--algo", "rome", "--prompt",
            "The mother tongue of {} is", "--subject", "Danielle Darrieux", "--target", "English",
            "--corpus", str(files / "corpus.txt"), "--tokens", "500", *extra]


def requests(files, name: str) -> list[str]:
    return ["edit", "--model", str(files / "model"), "--device", "cpu", "--algo", "emmet",
            "--requests", str(files / name)]


def evaluate(files, *extra: str, data: str = "data.json") -> list[str]:
    return ["eval", "--model", str(files / "model"), "--device", "cpu", "--algo", "emmet", "--data",
            str(files / data), "--out", str(files / "never"), *extra]


CASES = {
    "--set v_lr=abc": (lambda f: edit(f, "--set", "v_lr=abc"), "v_lr must be a number > 0, not 'abc'"),
    "--set clamp=abc": (lambda f: edit(f, "--set", "clamp_norm_factor=abc"), "clamp_norm_factor must be a number"),
    "--set layers and --layers": (lambda f: edit(f, "--layers", "2", "--set", "layers=3"), "repeats --layers"),
    "--set seed and --seed": (lambda f: edit(f, "--seed", "0", "--set", "seed=1"), "repeats --seed"),
    "--set stats_tokens=-5": (lambda f: [*edit(f)[:-2], "--set", "stats_tokens=-5"],
                              "stats_tokens must be a whole number ≥ 1"),
    "--set unreadable": (lambda f: edit(f, "--set", "v_lr=[1"), "cannot read the value"),
    "--set unknown": (lambda f: edit(f, "--set", "learning_rate=1"), "unknown hyper-parameter"),
    "--requests unknown key": (lambda f: requests(f, "subj.json"), "unknown key(s) 'subj'"),
    "--requests paraphrase": (lambda f: requests(f, "paraphrase.json"), "unknown key(s) 'paraphrase'"),
    "--requests number": (lambda f: requests(f, "number.json"), "target_new must be text, not 5"),
    "--requests not json": (lambda f: requests(f, "binary.txt"), "is not a JSON file"),
    "--requests same key": (lambda f: requests(f, "same_key.json"), "hence the same key"),
    "--save not writable": (lambda f: edit(f, "--save", str(f / "corpus.txt" / "edited")), "cannot write --save"),
    "--corpus binary": (lambda f: [*edit(f)[:-4], "--corpus", str(f / "binary.txt")], "is not UTF-8 text"),
    "--corpus unknown": (lambda f: [*edit(f)[:-4], "--corpus", "no-such-corpus"], "unknown corpus"),
    "--device banana": (lambda f: [*edit(f)[:4], "banana", *edit(f)[5:]], "unknown device 'banana'"),
    "--device-map bad": (lambda f: edit(f, "--device-map", "everywhere"), "unknown device map"),
    "subject inside a word": (lambda f: [*edit(f)[:7], "--prompt", "Paris is the capital of", "--subject", "Par",
                                         *edit(f)[11:]], "occurs only inside a longer word"),
    "layer out of range": (lambda f: edit(f, "--layers", "9"), "layer 9 is out of range"),
    "prompt too long": (lambda f: [*edit(f)[:7], "--prompt", "Paris is in France. " * 40 + "The mother tongue of {} is",
                                   *edit(f)[9:]], "more than the model's context of 128"),
    "--data not json": (lambda f: evaluate(f, data="plain.txt"), "is not valid JSON"),
    "--data csv": (lambda f: evaluate(f, data="table.csv"), "is not valid JSON"),
    "--data binary": (lambda f: evaluate(f, data="binary.txt"), "is not UTF-8 text"),
    "--batch-size 0": (lambda f: evaluate(f, "--batch-size", "0"), "--batch-size must be ≥ 1, not 0"),
    "--n -1": (lambda f: evaluate(f, "--n", "-1"), "--n must be ≥ 1, not -1"),
    "--out not writable": (lambda f: [*evaluate(f)[:-2], "--out", str(f / "corpus.txt" / "out")],
                           "cannot write --out"),
    "stats --tokens 0": (lambda f: ["stats", "--model", str(f / "model"), "--layers", "1", "--tokens", "0"],
                         "--tokens must be ≥ 1, not 0"),
    "stats layer out of range": (lambda f: ["stats", "--model", str(f / "model"), "--device", "cpu", "--layers",
                                            "7", "--corpus", str(f / "corpus.txt")], "out of range"),
}
if not torch.cuda.is_available():
    CASES["--device cuda without a GPU"] = (lambda f: [*edit(f)[:4], "cuda", *edit(f)[5:]], "no CUDA GPU")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_cli_input_is_one_line_and_exit_2(case, files, capsys, isolated_cache):
    argv, message = CASES[case]
    assert main(argv(files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("emmet: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not any("Traceback" in line for line in err)
    assert not (files / "never").exists() and not (files / "corpus.txt").is_dir()


def test_ctrl_c_is_one_line_and_exit_130(files, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "long.txt"
    corpus.write_text("\n\n".join(CORPUS * 4000), encoding="utf-8")
    env = {**os.environ, "EMMET_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "emmet_core", "stats", "--model", str(files / "model"),
                                "--device", "cpu", "--layers", "3", "--corpus", str(corpus), "--tokens", "5000000"],
                               stderr=subprocess.PIPE, text=True, env=env,
                               # as from a terminal: a background job (nohup … &) inherits SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.monotonic() + 300  # loading and tokenising take a minute on a busy 2-core machine
    while "covariance" not in seen and time.monotonic() < deadline:  # the work has started
        char = process.stderr.read(1)
        assert char or process.poll() is None, f"the run ended before its work started: {seen!r}"
        seen += char
    assert "covariance" in seen, seen
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    lines = [line for line in (seen + rest).replace("\r", "\n").splitlines() if line.strip()]
    assert process.returncode == 130
    assert lines[-1].startswith("emmet: interrupted") and not any("Traceback" in line for line in lines)
