"""Evaluation datasets: CounterFact (ROME layout and MEND/EasyEdit layout) and zsRE
(MEND layout), turned into edit requests plus the prompts each edit is tested on.

Records that cannot be used raise :class:`BadRecordError` naming the record; with
``skip_bad=True`` they are skipped and counted instead.

Generation prompts: the ROME layout has them; the MEND layout does not, so they are
derived from the record as the rewrite prompt and the paraphrase prompt (the texts the
edit should change how the model continues).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EditError
from .request import EditRequest


class BadRecordError(EditError):
    """A dataset record is malformed; the message names it."""


@dataclass
class EvalRecord:
    case_id: int | str
    request: EditRequest
    paraphrase_prompts: list[str] = field(default_factory=list)
    # Neighbourhood prompts and the object each must keep (CounterFact: the old object).
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    name: str
    kind: str  # "counterfact" or "zsre"
    records: list[EvalRecord]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)


def _text(record: dict, key: str, index: int) -> str:
    value = record.get(key)
    if isinstance(value, dict):  # ROME layout: {"str": ..., "id": ...}
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise BadRecordError(f"record {index} (case_id {record.get('case_id', '?')}): missing or empty {key!r}")
    return value.strip()


def _request(prompt: str, subject: str, new: str, true: str | None, index: int, case) -> EditRequest:
    try:
        return EditRequest(prompt, subject, new, true)
    except EditError as exc:
        raise BadRecordError(f"record {index} (case_id {case}): {exc}") from None


def _counterfact_rome(record: dict, index: int) -> EvalRecord:
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, dict):
        raise BadRecordError(f"record {index}: 'requested_rewrite' is not an object")
    true = _text(rewrite, "target_true", index)
    request = _request(_text(rewrite, "prompt", index), _text(rewrite, "subject", index),
                       _text(rewrite, "target_new", index), true, index, record.get("case_id"))
    neighbours = [p for p in record.get("neighborhood_prompts", []) if isinstance(p, str)]
    return EvalRecord(record.get("case_id", index), request,
                      [p for p in record.get("paraphrase_prompts", []) if isinstance(p, str)],
                      neighbours, [true] * len(neighbours),
                      [p for p in record.get("generation_prompts", []) if isinstance(p, str)])


def _counterfact_mend(record: dict, index: int) -> EvalRecord:
    case = record.get("case_id", index)
    request = _request(_text(record, "prompt", index), _text(record, "subject", index),
                       _text(record, "target_new", index), _text(record, "ground_truth", index), index, case)
    paraphrase = _text(record, "rephrase_prompt", index)
    return EvalRecord(case, request, [paraphrase], [_text(record, "locality_prompt", index)],
                      [_text(record, "locality_ground_truth", index)], [request.text, paraphrase])


def _zsre(record: dict, index: int) -> EvalRecord:
    answers = record.get("answers") or [None]
    request = _request(_text(record, "src", index), _text(record, "subject", index),
                       _text(record, "alt", index), answers[0] if isinstance(answers[0], str) else None,
                       index, record.get("case_id", index))
    paraphrase = _text(record, "rephrase", index)
    return EvalRecord(record.get("case_id", index), request, [paraphrase], [_text(record, "loc", index)],
                      [_text(record, "loc_ans", index)], [])


def detect_layout(record: dict) -> str:
    if "requested_rewrite" in record:
        return "counterfact-rome"
    if "src" in record and "alt" in record:
        return "zsre-mend"
    if "prompt" in record and "ground_truth" in record:
        return "counterfact-mend"
    raise BadRecordError(f"unknown record layout with keys {sorted(record)}")


_PARSERS = {"counterfact-rome": _counterfact_rome, "counterfact-mend": _counterfact_mend, "zsre-mend": _zsre}


def parse_records(raw: list, name: str, skip_bad: bool = False) -> Dataset:
    """Turn raw JSON records (one layout per dataset) into evaluation records."""
    if not isinstance(raw, list) or not raw:
        raise BadRecordError(f"{name}: expected a non-empty JSON list of records")
    layout = detect_layout(raw[0]) if isinstance(raw[0], dict) else None
    if layout is None:
        raise BadRecordError(f"{name}: record 0 is not an object")
    records, skipped = [], []
    for index, record in enumerate(raw):
        try:
            if not isinstance(record, dict):
                raise BadRecordError(f"record {index} is not an object")
            records.append(_PARSERS[layout](record, index))
        except (BadRecordError, KeyError) as exc:
            message = str(exc) if isinstance(exc, BadRecordError) else f"record {index}: missing {exc}"
            if not skip_bad:
                raise BadRecordError(f"{name}: {message} (use --skip-bad to skip such records)") from None
            skipped.append((index, message))
    return Dataset(name, layout.split("-")[0], records, skipped)


def load_dataset(source: str, skip_bad: bool = False) -> Dataset:
    """A local JSON/JSONL file, or a hub dataset id (``hf:NAME[:SPLIT]``, online users)."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
            raw = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" \
                else json.loads(text)
        except OSError as exc:
            raise BadRecordError(f"cannot read {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise BadRecordError(f"{source} is not UTF-8 text: expected a JSON list of records") from None
        except json.JSONDecodeError as exc:
            raise BadRecordError(f"{source} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                                 "expected a JSON list of CounterFact or zsRE records") from None
        return parse_records(raw, path.name, skip_bad)
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        rows = datasets.load_dataset(name, split=split or "train")
        return parse_records([dict(r) for r in rows], name, skip_bad)
    raise BadRecordError(f"dataset {source!r} is neither a file nor hf:NAME[:SPLIT]")
