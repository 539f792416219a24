"""bench/gpu.py as a lent GPU machine runs it, dry-run on the CPU with tiny widths: the
assets it carries are written, every stage runs and lands in the results file, and the
stages' own checks (two sessions isolated, exact undo) hold. Its numbers are not judged
here: speed is measured on the GPU, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
# A dry run checks that every stage works, not how fast: one torch thread, so that a busy
# 2-core machine does not make a second thread spin (16 s alone, over 10 min beside an eval).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_gpu_bench_dry_run_writes_every_stage(tmp_path):
    assets, out = tmp_path / "assets", tmp_path / "gpu-tiny.json"
    subprocess.run([sys.executable, str(BENCH), "--prepare", "--assets", str(assets)], check=True,
                   capture_output=True, timeout=300, env=ENV)
    assert {p.name for p in assets.iterdir()} == {"tokenizer", "corpus.jsonl", "counterfact.json", "revision.txt"}
    done = subprocess.run([sys.executable, str(BENCH), "--tiny", "--assets", str(assets), "--out", str(out),
                           "--budget", "600"], capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = json.loads(out.read_text())["stages"]
    expected = {"env", "tokenize"} | {f"{m}:{s}" for m in ("gpt2-xl", "llama-2-7b", "gpt-j-6b")
                                      for s in ("build", "c0", "rome")}
    expected |= {f"gpt2-xl:{s}" for s in ("emmet-1k", "memit-1k", "emmet-10k", "memit-10k", "eval", "workspace")}
    assert set(stages) == expected
    assert {name: entry["status"] for name, entry in stages.items()} == dict.fromkeys(expected, "ok")
    assert stages["gpt2-xl:workspace"]["ok"] is True
    assert stages["gpt2-xl:emmet-10k"]["facts"] == 250 and stages["gpt2-xl:emmet-10k"]["value_precision"] == "bfloat16"
    c0 = stages["gpt2-xl:c0"]
    assert c0["layer"] == 17 and all(c0[p]["tokens_per_s"] > 0 for p in ("float32", "tf32", "bfloat16"))
    assert c0["bfloat16"]["rel_diff_from_float32"] > 0  # the CPU runs bf16 autocast for real
    assert stages["env"]["revision"]

    # One stage on its own, as a second GPU call would run the 10k batches.
    again = subprocess.run([sys.executable, str(BENCH), "--tiny", "--assets", str(assets), "--out", str(out),
                            "--stages", "gpt2-xl:emmet-10k"], capture_output=True, text=True, timeout=600,
                           env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(json.loads(out.read_text())["stages"]) == {"env", "gpt2-xl:build", "gpt2-xl:emmet-10k"}
