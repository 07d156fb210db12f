"""Benchmark files as they are distributed, read into one record type (`ExamRecord`).

Formats, detected from the fields of a file's first record (`detect_format`), or forced:

    medcare   {"question", "options": {letter: text} or [text, ...], "answer": "B", "subject"?}
    medqa     MedQA / MMedBench: {"question", "options": {A..E}, "answer_idx": "C", "answer": text,
              "meta_info"?}; subject = meta_info
    medmcqa   {"question", "opa".."opd", "cop", "subject_name"?}; `cop` is 1-based (1..4) in the
              original JSON release and 0-based (0..3) in the Hugging Face copy: the file decides
              (`medmcqa_base`); medmcqa0 / medmcqa1 force it
    cmb       CMB-Exam: {"question", "option": {A..E}, "answer": "ABD", "question_type",
              "exam_type"?, "exam_subject"?}; subject = exam_subject, else exam_type; empty
              option texts (CMB pads its option dict to A..E) are not options
    cmexam    CMExam CSV: Question, Options ("A xxx" lines), Answer ("A" or "AB"); subject =
              "Medical Discipline"
    columns   MMLU / CMMLU / C-Eval CSVs: question/Question, A, B, C, D (E...), answer/Answer;
              MMLU's header-less 6-column rows are read as question, A, B, C, D, answer;
              subject = the file name without _test/_val/_dev (one file per subject)

Files are JSON (an array), JSONL or CSV (Parquet through `data/dataset.py`'s reader). A file whose first
record is a conversation (`conversations` / `messages`) is not an exam (`read_eval_file`).
A record that does not fit its file's format is a DataError naming file, record and field.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from medcare_dist.errors import DataError
from medcare_dist.errors import InputNotFoundError

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SPLIT_SUFFIX = re.compile(r"_(test|val|dev|train|validation)$")
_OPTION_LINE = re.compile(r"^\s*([A-Z])\s*[.．、:：)）]?\s*(.*)$")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ExamRecord:
    index: int  # position in its file
    question: str
    options: dict[str, str]  # letter -> text, in the file's order
    answers: tuple[str, ...]  # the gold letters, in option order (one, or several)
    subject: str | None = None
    lang: str = "en"
    multi: bool = False  # a multiple-answer question: more than one gold letter, or its file says so

    @property
    def answer(self) -> str:
        """The gold letters as one string ("B", "ACD")."""
        return "".join(self.answers)


def question_language(question: str) -> str:
    return "zh" if _CJK.search(question) else "en"


# ------------------------------------------------------------------------------ field checks


def _text(record: dict, key: str, what: str | None = None) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {what or key!r} is missing or not a non-empty string")
    return value.strip()


def _options(raw: Any, field: str, drop_empty: bool = False) -> dict[str, str]:
    if isinstance(raw, list):
        raw = {LETTERS[i]: text for i, text in enumerate(raw)}
    if not isinstance(raw, dict):
        raise DataError(f"field {field!r} must be an object {{letter: text}} or a list")
    options: dict[str, str] = {}
    for key, text in raw.items():
        letter = str(key).strip().upper()
        if not re.fullmatch(r"[A-Z]", letter):
            raise DataError(f"field {field!r}: option key {key!r} is not a single letter A-Z")
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        if drop_empty and (text is None or (isinstance(text, str) and not text.strip())):
            continue
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"field {field!r}: option {letter} is not a non-empty string")
        if letter in options:
            raise DataError(f"field {field!r}: option {letter} appears twice")
        options[letter] = text.strip()
    if len(options) < 2:
        raise DataError(f"field {field!r} has fewer than 2 options")
    return options


def _letters(raw: Any, field: str, options: dict[str, str]) -> tuple[str, ...]:
    """Gold letters from "B", "ACD", "A,C", "A、C" (any case, full-width normalised)."""
    import unicodedata

    if raw is None:
        raise DataError(f"field {field!r} is missing")
    text = unicodedata.normalize("NFKC", str(raw)).upper()
    letters = re.sub(r"[\s,，、;；/]+", "", text)
    if not letters or not re.fullmatch(r"[A-Z]+", letters):
        raise DataError(f"field {field!r}: {raw!r} is not one or more option letters")
    bad = [x for x in letters if x not in options]
    if bad:
        raise DataError(f"field {field!r}: answer {raw!r} is not among the option letters {', '.join(options)}")
    if len(set(letters)) != len(letters):
        raise DataError(f"field {field!r}: answer {raw!r} repeats a letter")
    return tuple(x for x in options if x in letters)


def _subject(record: dict, *keys: str) -> str | None:
    for key in keys:
        value = record.get(key)
        if value not in (None, "") and not isinstance(value, (dict, list)):
            return str(value).strip()
    return None


def _record(index: int, question: str, options: dict, answers: tuple, subject: str | None, multi: bool = False) -> ExamRecord:
    return ExamRecord(index, question, options, answers, subject, question_language(question), multi or len(answers) > 1)


# ------------------------------------------------------------------------------ formats


def _medcare(record: dict, index: int, ctx: dict) -> ExamRecord:
    options = _options(record.get("options"), "options")
    return _record(index, _text(record, "question"), options, _letters(record.get("answer"), "answer", options),
                   _subject(record, "subject"))


def _medqa(record: dict, index: int, ctx: dict) -> ExamRecord:
    options = _options(record.get("options"), "options")
    return _record(index, _text(record, "question"), options, _letters(record.get("answer_idx"), "answer_idx", options),
                   _subject(record, "meta_info", "subject"))


def _medmcqa(record: dict, index: int, ctx: dict) -> ExamRecord:
    options = {letter: _text(record, key) for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"))}
    cop = record.get("cop")
    base = ctx["cop_base"]
    if isinstance(cop, str) and cop.strip().isdigit():
        cop = int(cop)
    if not isinstance(cop, int) or isinstance(cop, bool) or not base <= cop <= base + 3:
        raise DataError(f"field 'cop': {cop!r} is not an option number {base}..{base + 3} (this file's cop is {base}-based)")
    return _record(index, _text(record, "question"), options, ("ABCD"[cop - base],), _subject(record, "subject_name"))


def _cmb(record: dict, index: int, ctx: dict) -> ExamRecord:
    options = _options(record.get("option"), "option", drop_empty=True)
    qtype = str(record.get("question_type") or "")
    multi = "多" in qtype or "multiple" in qtype.lower()
    return _record(index, _text(record, "question"), options, _letters(record.get("answer"), "answer", options),
                   _subject(record, "exam_subject", "exam_type"), multi)


def _cmexam(record: dict, index: int, ctx: dict) -> ExamRecord:
    raw = _text(record, "Options")
    options: dict[str, str] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        match = _OPTION_LINE.match(line)
        if not match or not match.group(2).strip():
            raise DataError(f"field 'Options': line {line.strip()!r} is not 'LETTER text'")
        options[match.group(1)] = match.group(2).strip()
    options = _options(options, "Options")
    return _record(index, _text(record, "Question"), options, _letters(record.get("Answer"), "Answer", options),
                   _subject(record, "Medical Discipline", "Clinical Department"))


def _columns(record: dict, index: int, ctx: dict) -> ExamRecord:
    qkey = "question" if "question" in record else "Question"
    akey = "answer" if "answer" in record else "Answer"
    options = _options({x: record.get(x) for x in LETTERS if x in record}, "A..D")
    return _record(index, _text(record, qkey), options, _letters(record.get(akey), akey, options), ctx["file_subject"])


FORMATS: dict[str, Callable[[dict, int, dict], ExamRecord]] = {
    "medcare": _medcare, "medqa": _medqa, "medmcqa": _medmcqa, "medmcqa0": _medmcqa, "medmcqa1": _medmcqa,
    "cmb": _cmb, "cmexam": _cmexam, "columns": _columns, "mmlu": _columns, "cmmlu": _columns, "ceval": _columns,
}


def detect_format(record: Any) -> str | None:
    """The format whose fields the record has, "conversations", or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if keys & {"conversations", "messages"}:
        return "conversations"
    if {"question", "options", "answer_idx"} <= keys:
        return "medqa"
    if {"question", "opa", "opb", "cop"} <= keys:
        return "medmcqa"
    if {"question", "option", "answer"} <= keys:
        return "cmb"
    if {"Question", "Options", "Answer"} <= keys:
        return "cmexam"
    if {"question", "options", "answer"} <= keys:
        return "medcare"
    if keys & {"question", "Question"} and keys & {"answer", "Answer"} and {"A", "B"} <= keys:
        return "columns"
    return None


def medmcqa_base(records: list[dict], forced: str) -> int:
    """0 or 1: how a MedMCQA file numbers `cop` (its records decide unless the format says)."""
    if forced in ("medmcqa0", "medmcqa1"):
        return int(forced[-1])
    values = {r.get("cop") for r in records if isinstance(r, dict)}
    values = {int(v) for v in values if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())}
    if 0 in values and 4 in values:
        raise DataError("field 'cop' has both 0 and 4: neither 0- nor 1-based")
    if 0 in values:
        return 0
    if 4 in values:
        return 1
    raise DataError("field 'cop' never is 0 or 4, so its base is unknown: pass --format medmcqa0 or medmcqa1")


# ------------------------------------------------------------------------------ files


def _csv_rows(path: Path) -> Iterator[tuple[int, int, Any]]:
    """(index, line, row dict) of a CSV file; a header-less file (MMLU) gets the columns
    question, A, B, C, D, answer."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        if not {"question", "Question"} & set(names):
            if len(names) != 6:
                raise DataError(f"a CSV without a question/Question header must have 6 columns "
                                f"(question, A, B, C, D, answer as in MMLU), its first row has {len(names)}", path)
            rows = [header]
            names = ["question", "A", "B", "C", "D", "answer"]
        else:
            rows = []
        index = 0
        for row in _chain(rows, reader):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                yield index, reader.line_num, DataError(f"{len(row)} columns where the header has {len(names)}")
            else:
                yield index, reader.line_num, dict(zip(names, row))
            index += 1


def _chain(first: list, rest) -> Iterator:
    yield from first
    yield from rest


def raw_records(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    if path.suffix == ".csv":
        return _csv_rows(path)
    from medcare_dist.data.sources import raw_records as data_records  # JSON, JSONL and Parquet, as training data is read

    return data_records(path)


def read_eval_file(path: str | Path, fmt: str | None = None) -> tuple[str, list[ExamRecord] | None]:
    """(format name, records), or ("conversations", None) for a conversation file (read by
    `data.build_dataset`). `fmt` forces a format (a name in FORMATS)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"data file not found: {path}")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (one of {', '.join(sorted(FORMATS))})", path)
    located = []
    for index, line, raw in raw_records(path):
        if isinstance(raw, DataError):
            raise raw.at(path, index, line)
        located.append((index, line, raw))
    if not located:
        raise DataError("no records", path)
    name = fmt or detect_format(located[0][2])
    if name == "conversations":
        return "conversations", None
    if name is None:
        keys = sorted(located[0][2]) if isinstance(located[0][2], dict) else type(located[0][2]).__name__
        raise DataError(f"record 0 fits no known benchmark format (fields: {keys}); pass --format NAME", path)
    ctx = {"file_subject": _SPLIT_SUFFIX.sub("", path.stem)}
    if name.startswith("medmcqa"):
        try:
            ctx["cop_base"] = medmcqa_base([raw for _, _, raw in located], name)
        except DataError as err:
            raise DataError(err.reason, path) from None
    records = []
    for index, line, raw in located:
        try:
            if not isinstance(raw, dict):
                raise DataError(f"not an object (got {type(raw).__name__})")
            records.append(FORMATS[name](raw, index, ctx))
        except DataError as err:
            raise DataError(f"{err.reason} ({name} format)").at(path, index, line) from None
    return name, records
