"""Accuracy blocks of an exam evaluation, and the printed summary in the papers' shape: one
row per benchmark file, the average over them last (accuracies in percent)."""

from __future__ import annotations

from pathlib import Path

METHODS = ("loglik", "cloze", "generate", "reference")


def accuracy_block(rows: list[dict], methods: tuple[str, ...]) -> dict:
    """{"records": n, "<method>": {"correct", "accuracy", "unparsed"}} over `rows`."""
    n = len(rows)
    block: dict = {"records": n}
    for method in methods:
        correct = sum(bool(r[method]["correct"]) for r in rows)
        block[method] = {"correct": correct, "accuracy": correct / n if n else None,
                         "unparsed": sum(r[method]["pred"] is None for r in rows)}
    return block


def exam_result(path: Path, fmt: str, rows: list[dict], methods: tuple[str, ...]) -> dict:
    result = {"path": str(path), "kind": "exam", "format": fmt, **accuracy_block(rows, methods)}
    subjects = sorted({r["subject"] for r in rows if r["subject"] is not None})
    if subjects:
        result["subjects"] = {name: accuracy_block([r for r in rows if r["subject"] == name], methods)
                              for name in subjects}
    result["multiple_answer"] = sum(r["multi"] for r in rows)
    result["predictions"] = rows
    return result


def average(results: list[dict], methods: tuple[str, ...]) -> dict:
    """The unweighted mean over exam files of each method's accuracy (as the papers average)."""
    exams = [r for r in results if r["kind"] == "exam" and r["records"]]
    return {m: sum(r[m]["accuracy"] for r in exams) / len(exams) if exams else None for m in methods} | {"files": len(exams)}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_table(report: dict) -> str:
    """Exam files (accuracy % per method, unparsed generations), the average last; then the
    conversation files (held-out loss, perplexity)."""
    methods = tuple(report["settings"]["methods"])
    files = report["files"]
    lines: list[str] = []
    exams = [r for r in files if r["kind"] == "exam"]
    if exams:
        rows = [("benchmark", "records", *methods, *(("unparsed",) if "generate" in methods else ()))]
        for r in exams:
            rows.append((Path(r["path"]).name, str(r["records"]), *(_pct(r[m]["accuracy"]) for m in methods),
                         *((str(r["generate"]["unparsed"]),) if "generate" in methods else ())))
        avg = report["average"]
        rows.append((f"average ({avg['files']})", "", *(_pct(avg[m]) for m in methods),
                     *(("",) if "generate" in methods else ())))
        lines += _table(rows)
    convs = [r for r in files if r["kind"] == "conversations"]
    if convs:
        if lines:
            lines.append("")
        rows = [("held-out conversations", "records", "label_tokens", "loss", "ppl")]
        rows += [(Path(r["path"]).name, str(r["records"]), str(r["label_tokens"]), f"{r['loss']:.4f}",
                  f"{r['perplexity']:.2f}") for r in convs]
        lines += _table(rows)
    return "\n".join(lines)


def compare_table(named_reports: list[tuple[str, dict]]) -> str:
    """Several reports side by side, one row each (e.g. base, stage-1 checkpoint, stage-2 base,
    final model): each exam file's accuracy (%) per method, each conversation file's loss."""
    columns: list[tuple[str, str, str]] = []  # (header, file path, method or "loss")
    for _, report in named_reports:
        for f in report["files"]:
            keys = report["settings"]["methods"] if f["kind"] == "exam" else ["loss"]
            for key in keys:
                if not any(c[1:] == (f["path"], key) for c in columns):
                    columns.append((f"{Path(f['path']).stem} {key}", f["path"], key))

    def cell(report: dict, path: str, key: str) -> str:
        f = next((f for f in report["files"] if f["path"] == path), None)
        if f is None or (key != "loss" and key not in f):
            return "-"
        return f"{f['loss']:.4f}" if key == "loss" else _pct(f[key]["accuracy"])

    rows = [("model", *(c[0] for c in columns))]
    rows += [(name, *(cell(report, path, key) for _, path, key in columns)) for name, report in named_reports]
    return "\n".join(_table(rows))
