"""End to end in a real browser: `streamlit run` on localhost, Debian's Chromium driven by
Playwright, the default model. Types a fact, applies ROME, waits for the charts and saves
a screenshot to tests/artifacts/ (ignored by git) for a person to look at; also lecture
mode, a multi-fact comparison and a lifelong run. The Edit page's waits (click to charts,
click to texts) are written to tests/artifacts/edit-page-timings.json: figures to read,
not assertions."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing and allowed (root)."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=1200).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=1200)
    if not CHROMIUM.exists():
        pytest.fail("the browser test drives Debian's Chromium at /usr/bin/chromium: install it with "
                    "'sudo apt-get install -y chromium' (Playwright's own browser download is not used)")
    return str(CHROMIUM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`streamlit run` on a free localhost port, stopped after the module."""
    port = free_port()
    log = (tmp_path_factory.mktemp("streamlit") / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "EMMET_MODEL"}
    env.setdefault("OMP_NUM_THREADS", "1")  # on a busy 2-core machine a second thread only spins
    command = [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.headless", "true",
               "--server.address", "localhost", "--server.port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start (see {log.name})")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def full_page_screenshot(page, path: Path) -> None:
    """Streamlit scrolls inside its main block: grow the window to the content first."""
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": height + 40})
    page.wait_for_timeout(1500)  # let the charts redraw at the new size
    page.screenshot(path=str(path), full_page=True)


@contextmanager
def browser_page(chromium: str, name: str) -> Iterator:
    """A Chromium page; if the test fails, what the page showed is kept as
    tests/artifacts/NAME-failure.png and .txt for whoever reads the failure."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            yield page
        except Exception:
            full_page_screenshot(page, ARTIFACTS / f"{name}-failure.png")
            (ARTIFACTS / f"{name}-failure.txt").write_text(page.inner_text("body"), encoding="utf-8")
            raise
        finally:
            browser.close()


def test_type_a_fact_apply_rome_and_see_the_charts(server, chromium):
    from playwright.sync_api import expect

    with browser_page(chromium, "edit-page") as page:
        page.goto(server)
        apply = page.get_by_role("button", name="Apply edit with ROME")
        apply.wait_for(timeout=180_000)  # the model loads on the first visit
        for label, value in (("Subject", "Eiffel Tower"), ("Relation prompt", "The {} is located in the city of"),
                             ("New object", "Rome")):
            box = page.get_by_role("textbox", name=label, exact=True)
            box.fill(value)
            box.press("Enter")  # commits the value (Tab would open the next field's help tooltip)
        old = page.get_by_role("textbox", name="Old object (the model's answer now)")
        expect(old).to_have_value("Paris", timeout=120_000)  # pre-filled with the model's answer
        paraphrases = page.get_by_role("textbox", name="Paraphrases (one per line)")
        expect(paraphrases).to_have_value(re.compile("The Eiffel Tower is in"))
        page.mouse.click(1200, 960)  # a blank spot: nothing focused, no tooltip
        page.mouse.move(0, 0)
        page.screenshot(path=str(ARTIFACTS / "edit-page-filled.png"))
        clicked = time.perf_counter()
        apply.click()
        expect(page.get_by_text("Probability on the prompt").first).to_be_visible(timeout=600_000)
        to_charts = time.perf_counter() - clicked
        expect(page.get_by_text("The Eiffel Tower is located in the city of … Paris → Rome")).to_be_visible()
        expect(page.get_by_text("Generation entropy")).to_be_visible(timeout=300_000)  # drawn once texts are done
        to_texts = time.perf_counter() - clicked
        expect(page.locator(".js-plotly-plot")).to_have_count(6, timeout=30_000)
        timings = {"click_to_charts_s": round(to_charts, 2), "click_to_texts_s": round(to_texts, 2),
                   "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
                   "goal": "charts <= 5 s, texts <= 8 s on the idle 2-core CPU with stats cached"}
        (ARTIFACTS / "edit-page-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        assert page.get_by_text("Traceback").count() == 0
        probability = page.get_by_test_id("stMetric").filter(has_text="P(Rome)")
        value = probability.get_by_test_id("stMetricValue").inner_text()
        assert value.endswith("%") and float(value[:-1]) > 50, value
        full_page_screenshot(page, ARTIFACTS / "edit-page-after-rome.png")
    assert (ARTIFACTS / "edit-page-after-rome.png").stat().st_size > 50_000


def test_a_lifelong_run_streams_facts_and_draws_its_curves(server, chromium):
    """The Lifelong page in a real browser: four CounterFact facts into MEMIT and ENCORE in
    batches of two, checkpoints every two facts, run to the end: the curves and the watched
    prompt's continuation at each checkpoint appear."""
    from playwright.sync_api import expect

    with browser_page(chromium, "lifelong-page") as page:
        page.goto(f"{server}/lifelong")
        start = page.get_by_role("button", name="New run")
        start.wait_for(timeout=180_000)
        for label, value in (("Facts to sample", "4"), ("Facts per batch", "2"), ("Checkpoint every … facts", "2")):
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Enter")
        page.wait_for_timeout(1000)
        start.click()
        run = page.get_by_role("button", name="Run", exact=True)
        expect(run).to_be_enabled(timeout=60_000)  # the run is set up
        run.click()
        expect(page.get_by_text("Done ·")).to_be_visible(timeout=600_000)
        expect(page.locator(".js-plotly-plot")).to_have_count(1, timeout=30_000)
        assert page.get_by_text("Traceback").count() == 0
        expect(page.get_by_text("What the model writes after")).to_be_visible()
        full_page_screenshot(page, ARTIFACTS / "lifelong-page.png")
    assert (ARTIFACTS / "lifelong-page.png").stat().st_size > 50_000


def test_lecture_mode_and_a_comparison_of_several_facts(server, chromium):
    """Lecture mode on: an example edited with texts written only when asked, the ask box
    answering with the original and the edited model side by side; then Compare on three
    sampled CounterFact facts with ROME and EMMET, with its margin chart."""
    from playwright.sync_api import expect

    with browser_page(chromium, "lecture-compare") as page:
        page.goto(server)
        apply = page.get_by_role("button", name="Apply edit with ROME")
        apply.wait_for(timeout=180_000)
        page.get_by_text("Lecture mode").click()
        old = page.get_by_role("textbox", name="Old object (the model's answer now)")
        expect(old).not_to_have_value("", timeout=120_000)
        apply.click()
        expect(page.get_by_text("Probability on the prompt").first).to_be_visible(timeout=600_000)
        write = page.get_by_role("button", name=re.compile("Write 2 texts"))
        expect(write).to_be_visible()
        assert page.get_by_text("Generation entropy").count() == 0  # no texts until asked
        write.click()
        expect(page.get_by_text("Generation entropy")).to_be_visible(timeout=300_000)
        expect(page.get_by_text("Probability on the prompt")).to_have_count(1)  # the report shown once
        ask = page.get_by_role("textbox", name="Prompt", exact=True)
        ask.fill("The mother tongue of Danielle Darrieux is")
        ask.press("Enter")
        expect(page.get_by_text("This session's model")).to_be_visible(timeout=120_000)
        assert page.get_by_text("Traceback").count() == 0
        full_page_screenshot(page, ARTIFACTS / "edit-page-lecture-mode.png")

        page.set_viewport_size({"width": 1400, "height": 1000})
        page.goto(f"{server}/compare")
        page.get_by_text("Sample from CounterFact").click()
        count = page.get_by_label("Facts to sample", exact=True)
        count.fill("3")
        count.press("Enter")
        tokens = page.get_by_label("Generated tokens per text (GE)", exact=True)
        tokens.fill("0")
        tokens.press("Enter")
        page.get_by_role("button", name="MEMIT", exact=True).click()  # ROME and EMMET stay chosen
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Run the comparison").click()
        expect(page.get_by_text("3 facts × 2 editors × 1 repeat")).to_be_visible(timeout=600_000)
        expect(page.locator(".js-plotly-plot")).to_have_count(3, timeout=30_000)
        assert page.get_by_text("Traceback").count() == 0
        full_page_screenshot(page, ARTIFACTS / "compare-several-facts.png")
    assert (ARTIFACTS / "compare-several-facts.png").stat().st_size > 50_000
