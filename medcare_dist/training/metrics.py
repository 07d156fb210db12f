"""Where training metrics go.

Every log interval the trainer builds one record (step, loss and its parts, lr, grad_norm,
tokens_per_s; in stage 1 the router load and entropy per FFN projection) and hands it to a
`MetricsReporter` on rank 0, which writes it to

- `output_dir/metrics.jsonl`, one JSON object per line: always;
- `output_dir/tensorboard/` (TensorBoard event files): when `report_to` contains
  "tensorboard". Every numeric field becomes a scalar: top-level fields as `train/<field>`,
  `router_load/<projection>/expert_<e>`, `router_entropy/<projection>`, and
  `router/collapsed_experts` (how many experts are in collapse).

A collapsed expert (`router_collapse`, `router/collapsed_experts`): method/router_health.py.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from medcare_dist.config import ConfigError
from medcare_dist.errors import OutputDirError

REPORT_TO_CHOICES = ("tensorboard", "jsonl", "none")  # jsonl is always on; "none" adds nothing
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"


def check_report_to(report_to: Iterable[str]) -> list[str]:
    """The validated `report_to` names; an unknown name, or tensorboard without the package,
    is a ConfigError (meant for startup, before any training step)."""
    names = [str(n).strip().lower() for n in report_to if str(n).strip()]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ConfigError(f"report_to: unknown {', '.join(map(repr, unknown))}; known: {', '.join(REPORT_TO_CHOICES)}")
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"report_to tensorboard needs the tensorboard package, which is not importable ({err}): "
                "pip install 'medcare-dist[tensorboard]' (or pip install tensorboard), or drop --report_to tensorboard"
            ) from None
    return names


def scalars(record: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) for every numeric field of a metrics record (see the module docstring)."""
    for key, value in record.items():
        if key == "step":
            continue
        if key == "router_collapse":
            continue  # summarised below
        yield from _flatten(key, value, top=True)
    if "router_load" in record:
        collapsed = record.get("router_collapse") or {}
        yield "router/collapsed_experts", float(sum(len(v) for v in collapsed.values()))


def _flatten(key: str, value, top: bool = False) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield (f"train/{key}" if top else key), float(value)
    elif isinstance(value, dict):
        for sub, v in value.items():
            yield from _flatten(f"{key}/{sub}", v)
    elif isinstance(value, (list, tuple)):
        item = "expert_" if key.startswith("router_load/") else ""
        for i, v in enumerate(value):
            yield from _flatten(f"{key}/{item}{i}", v)


class JsonlSink:
    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> int:
        """Drop the records past `step` (a resume from it logs them again): one record per
        step. A line cut short by a kill counts as past. Returns how many were dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_text("".join(line + "\n" for line in kept))
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise OutputDirError(f"{self.path}: cannot rewrite it for the resume: {err.strerror or err}") from None
            os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def close(self) -> None:
        pass


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class TensorBoardSink:
    """Scalars of every record under `log_dir`; the writer is opened at the first record and
    flushed after each one, so the files are complete whenever the run stops."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None
        self.purge_step: int | None = None

    def rewind(self, step: int) -> int:
        """Events past `step` are purged when the writer opens (TensorBoard's purge_step)."""
        self.purge_step = step + 1
        return 0

    def write(self, record: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
            atexit.register(self.close)
        step = int(record.get("step", 0))
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MetricsReporter:
    """The sinks of one run. Build it on every rank (so a bad `report_to` fails everywhere at
    startup); only an `enabled` one (rank 0) writes."""

    def __init__(self, output_dir: str | Path, report_to: Iterable[str] = (), enabled: bool = True):
        names = check_report_to(report_to)
        out = Path(output_dir)
        self.sinks = []
        if enabled:
            self.sinks.append(JsonlSink(out / METRICS_FILE))
            if "tensorboard" in names:
                self.sinks.append(TensorBoardSink(out / TENSORBOARD_DIR))

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def rewind(self, step: int) -> int:
        """A resume from `step`: the sinks forget what was logged past it (see JsonlSink.rewind)."""
        return sum(sink.rewind(step) for sink in self.sinks)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def warn(message: str) -> None:
    """Print to stderr on a line of its own, also while a tqdm progress bar is drawn there."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
