"""Per-record results of an exam evaluation as JSON Lines, and resuming an interrupted one.

    DIR/run.json                  what the records were made with (model, files, methods, ...)
    DIR/<NN>-<file stem>.part<R>.jsonl   the rows rank R evaluated, appended batch by batch

A later run with the same `--records DIR` reads every part file, skips the records already
there and evaluates the rest (on any number of ranks); a run with different settings is
refused. A last line cut short by the interruption is removed (that record is evaluated
again); an unreadable line elsewhere is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from medcare_dist.errors import ConfigError, FormatError

RUN_FILE = "run.json"


class RecordStore:
    def __init__(self, directory: str | Path, run_info: dict, rank: int = 0):
        self.dir, self.run_info, self.rank = Path(directory), run_info, rank

    def check(self) -> None:
        """Refuse a directory whose records were made with other settings (every rank, before work)."""
        run_file = self.dir / RUN_FILE
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--records {self.dir} is not a directory")
        if run_file.exists():
            before = json.loads(run_file.read_text(encoding="utf-8"))
            if before != self.run_info:
                diff = sorted(k for k in set(before) | set(self.run_info) if before.get(k) != self.run_info.get(k))
                raise ConfigError(f"{self.dir} holds records made with other settings ({', '.join(diff)} differ); "
                                 "use another --records directory")

    @staticmethod
    def key(position: int, path: Path) -> str:
        return f"{position:02d}-{path.stem}"

    def prepare(self, log=print) -> None:
        """On rank 0, after `check` and before the others read: write run.json, cut unfinished last lines."""
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / RUN_FILE
        if run_file.exists():
            log(f"resuming from the records in {self.dir}")
        else:
            run_file.write_text(json.dumps(self.run_info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for part in sorted(self.dir.glob("*.part*.jsonl")):
            data = part.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                part.write_bytes(data[:keep])
                log(f"{part}: removed an unfinished last record ({len(data) - keep} bytes); it is evaluated again")

    def done(self, key: str) -> dict[int, dict]:
        """{record index: row} of every rank's part file for this data file."""
        rows: dict[int, dict] = {}
        for part in sorted(self.dir.glob(f"{key}.part*.jsonl")):
            for line_no, line in enumerate(part.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise FormatError(f"{part}: line {line_no} is not JSON ({err}); delete the file to re-evaluate its records") from None
                rows[row["index"]] = row
        return rows

    def append(self, key: str, rows: list[dict]) -> None:
        with (self.dir / f"{key}.part{self.rank}.jsonl").open("a", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
            file.flush()
