"""Facts from an uploaded file (CSV, JSON or JSON Lines), checked before anything runs.

Whatever is wrong with a file (too big, not UTF-8, not CSV/JSON, missing columns, bad
rows) becomes one :class:`UploadError` with a message a person can act on. Rows that
cannot be edits are skipped and reported when others are usable.

Accepted layouts:
- CSV or JSON objects with ``subject``, ``prompt``, ``target_new`` and optionally
  ``target_true``, ``paraphrase`` (JSON: also a list ``paraphrases``), ``neighbour_prompt``
  and ``neighbour_target``; the CounterFact MEND names (``ground_truth``,
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``) are understood too.
- CounterFact in the ROME layout (``requested_rewrite``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import PurePath

from ..data import BadRecordError, EvalRecord, parse_records
from ..errors import EditError
from ..request import EditRequest

MAX_BYTES = 5 * 2**20
MAX_FACTS = 1000
REQUIRED = ("subject", "prompt", "target_new")
ALIASES = {
    "ground_truth": "target_true",
    "rephrase_prompt": "paraphrase",
    "locality_prompt": "neighbour_prompt",
    "locality_ground_truth": "neighbour_target",
    "neighborhood_prompt": "neighbour_prompt",
    "neighborhood_target": "neighbour_target",
    "object": "target_new",
    "new_object": "target_new",
    "old_object": "target_true",
}


class UploadError(EditError):
    """An uploaded file cannot be used; the message says why and what to do."""


@dataclass
class Upload:
    records: list[EvalRecord]
    skipped: list[str] = field(default_factory=list)  # one reason per skipped row


def parse_upload(name: str, data: bytes, max_bytes: int = MAX_BYTES, max_facts: int = MAX_FACTS) -> Upload:
    """Check and parse an uploaded file of facts."""
    suffix = PurePath(name).suffix.lower()
    if suffix not in (".csv", ".json", ".jsonl"):
        raise UploadError(f"{name}: upload a .csv, .json or .jsonl file (got {suffix or 'no extension'})")
    if len(data) > max_bytes:
        raise UploadError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB")
    if not data.strip():
        raise UploadError(f"{name} is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadError(f"{name} is not UTF-8 text (byte {data[exc.start]:#04x} at position {exc.start}); "
                          "save it as UTF-8 and upload it again") from None
    raw = _csv_rows(name, text) if suffix == ".csv" else _json_rows(name, text, suffix)
    if len(raw) > max_facts:
        raise UploadError(f"{name} has {len(raw)} facts; at most {max_facts} are edited at once: split the file")
    if raw and isinstance(raw[0], dict) and "requested_rewrite" in raw[0]:
        return _counterfact(name, raw)
    return _facts(name, raw)


def _csv_rows(name: str, text: str) -> list[dict]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        names = [n for n in (reader.fieldnames or []) if n]
        rows = list(reader)
    except csv.Error as exc:
        raise UploadError(f"{name} is not valid CSV: {exc}") from None
    missing = [c for c in REQUIRED if c not in _columns(names)]
    if missing:
        raise UploadError(f"{name} lacks the column(s) {', '.join(missing)} (found: {', '.join(names) or 'none'}); "
                          f"the first line must name the columns {', '.join(REQUIRED)}")
    if not rows:
        raise UploadError(f"{name} has a header but no facts")
    return rows


def _json_rows(name: str, text: str, suffix: str) -> list:
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UploadError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if isinstance(rows, dict):  # {"facts": [...]} or {"records": [...]}
        rows = next((v for v in rows.values() if isinstance(v, list)), None)
    if not isinstance(rows, list) or not rows:
        raise UploadError(f"{name}: expected a non-empty list of facts (objects with {', '.join(REQUIRED)})")
    return rows


def _columns(keys) -> set[str]:
    return {ALIASES.get(k.strip().lower(), k.strip().lower()) for k in keys if k}


def _facts(name: str, rows: list) -> Upload:
    records, skipped = [], []
    line = 2 if PurePath(name).suffix.lower() == ".csv" else None
    for index, row in enumerate(rows):
        where = f"line {index + line}" if line else f"fact {index + 1}"
        if not isinstance(row, dict):
            skipped.append(f"{where}: not an object")
            continue
        fields = {ALIASES.get(str(k).strip().lower(), str(k).strip().lower()): v for k, v in row.items() if k}
        missing = [c for c in REQUIRED if not _text(fields.get(c))]
        if missing:
            skipped.append(f"{where}: empty {', '.join(missing)}")
            continue
        try:
            request = EditRequest(_text(fields["prompt"]), _text(fields["subject"]), _text(fields["target_new"]),
                                  _text(fields.get("target_true")) or None)
        except EditError as exc:
            skipped.append(f"{where}: {exc}")
            continue
        paraphrases = _texts(fields.get("paraphrases")) + _texts(fields.get("paraphrase"))
        hood = _text(fields.get("neighbour_prompt"))
        records.append(EvalRecord(fields.get("case_id", index), request, paraphrases,
                                  [hood] if hood else [], [_text(fields.get("neighbour_target"))] if hood else [],
                                  [request.text, *paraphrases][:2]))
    return _checked(name, records, skipped)


def _counterfact(name: str, rows: list) -> Upload:
    try:
        dataset = parse_records(rows, name, skip_bad=True)
    except BadRecordError as exc:
        raise UploadError(str(exc)) from None
    return _checked(name, dataset.records, [reason for _, reason in dataset.skipped])


def _checked(name: str, records: list[EvalRecord], skipped: list[str]) -> Upload:
    if not records:
        reasons = "; ".join(skipped[:3]) + (" …" if len(skipped) > 3 else "")
        raise UploadError(f"{name} has no usable facts ({reasons})")
    return Upload(records, skipped)


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _texts(value: object) -> list[str]:
    if isinstance(value, list):
        return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return [_text(value)] if _text(value) else []
