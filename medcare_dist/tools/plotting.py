"""`medcare-dist plot metrics.jsonl --out run.png`: a training run at a glance.

One subplot per kind of value the file holds, in this order (a subplot only when its values
are there):

    loss              total loss and its LM part
    LM loss           loss_lm alone, on its own scale (when there are other parts)
    auxiliary losses  the other loss parts: loss_ortho (stage 2), loss_router_aux (stage 1)
    learning rate
    tokens/s
    router load       per FFN projection the smallest and largest expert share of the
                      routed assignments (one line each for up to 6 projections; beyond
                      that the extremes over all projections and the median projection's
                      min share), the balanced share 1/E, the collapse threshold (1% of
                      the tokens = 1% / top_k of the assignments) and the steps where the
                      record reports a collapse
    router entropy    per projection entropy / log E (1 = balanced, 0 = one expert),
                      or its min / median / max over projections beyond 6

Steps logged twice (a resumed run appends from its checkpoint) keep their latest record.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from medcare_dist.errors import ConfigError, FormatError, InputNotFoundError

MAX_LINES_PER_PROJECTION = 6  # beyond this many projections, plot summaries over them


def load_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, by step, the latest record of a step winning."""
    by_step: dict[int, dict] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{path}: line {n} is not JSON: {err}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise FormatError(f"{path}: line {n} is not a metrics record (no 'step')")
        by_step[int(record["step"])] = record
    if not by_step:
        raise FormatError(f"{path}: no metrics records")
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _short(target: str) -> str:
    """model.layers.3.mlp.gate_proj -> L3.gate_proj"""
    parts = target.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts):
            return f"L{parts[i + 1]}.{parts[-1]}"
    return target


def plot_metrics(records: list[dict], title: str | None = None):
    """A matplotlib Figure (Agg canvas) of the records; its axes carry the titles above."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ConfigError(f"plotting needs matplotlib ({err}): pip install 'medcare-dist[plot]' (or pip install matplotlib)") from None

    keys = set().union(*(r.keys() for r in records))
    aux = sorted(k for k in keys if k.startswith("loss_") and k != "loss_lm")
    panels = []
    if "loss" in keys or "loss_lm" in keys:
        panels.append("loss")
    if aux and "loss_lm" in keys:
        panels.append("LM loss")  # on its own scale: the other terms can dwarf it
    if aux:
        panels.append("auxiliary losses")
    if "lr" in keys:
        panels.append("learning rate")
    if "tokens_per_s" in keys:
        panels.append("tokens/s")
    loads = [r for r in records if r.get("router_load")]
    if loads:
        panels.append("router load")
    entropies = [r for r in records if r.get("router_entropy")]
    if entropies:
        panels.append("router entropy")
    if not panels:
        raise FormatError("the metrics hold none of loss, lr, tokens_per_s, router_load")

    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.5 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, whatever pyplot's is
    axes = {name: fig.add_subplot(rows, cols, i + 1) for i, name in enumerate(panels)}
    if title:
        fig.suptitle(title)

    if "loss" in axes:
        ax = axes["loss"]
        x, y = _series(records, "loss")
        if x:
            ax.plot(x, y, label="loss (total)")
        x_lm, y_lm = _series(records, "loss_lm")
        if x_lm and (x_lm, y_lm) != (x, y):  # equal to the total when there is no other term
            ax.plot(x_lm, y_lm, label="loss_lm", linestyle="--")
        _finish(ax, "loss", "loss")
    if "LM loss" in axes:
        axes["LM loss"].plot(*_series(records, "loss_lm"), label="loss_lm", color="C1")
        _finish(axes["LM loss"], "LM loss", "loss")
    if "auxiliary losses" in axes:
        ax = axes["auxiliary losses"]
        for key in aux:
            x, y = _series(records, key)
            ax.plot(x, y, label=key)
        _finish(ax, "auxiliary losses", "loss")
    if "learning rate" in axes:
        x, y = _series(records, "lr")
        axes["learning rate"].plot(x, y, label="lr")
        axes["learning rate"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        _finish(axes["learning rate"], "learning rate", "lr")
    if "tokens/s" in axes:
        x, y = _series(records, "tokens_per_s")
        axes["tokens/s"].plot(x, y, label="tokens/s")
        _finish(axes["tokens/s"], "tokens/s", "tokens/s")
    if "router load" in axes:
        _router_load(axes["router load"], loads)
    if "router entropy" in axes:
        _router_entropy(axes["router entropy"], entropies)
    return fig


def _finish(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    lines = ax.get_lines()
    if len(lines) > 6:  # many curves: the legend goes beside the plot, not over it
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif lines:
        ax.legend(fontsize="small", loc="best")


def _router_load(ax, records: list[dict]) -> None:
    from medcare_dist.method.router_health import COLLAPSE_MIN_SHARE

    targets = list(records[-1]["router_load"])
    steps = [r["step"] for r in records]
    lo = {t: [min(r["router_load"].get(t, [float("nan")])) for r in records] for t in targets}
    hi = {t: [max(r["router_load"].get(t, [float("nan")])) for r in records] for t in targets}
    if len(targets) <= MAX_LINES_PER_PROJECTION:
        for i, t in enumerate(targets):
            color = f"C{i % 10}"
            ax.plot(steps, lo[t], color=color, linestyle="-", label=f"{_short(t)} min")
            ax.plot(steps, hi[t], color=color, linestyle=":", label=f"{_short(t)} max")
    else:
        ax.plot(steps, [min(lo[t][i] for t in targets) for i in range(len(steps))], label="min share (all projections)")
        ax.plot(steps, [statistics.median(lo[t][i] for t in targets) for i in range(len(steps))], label="median projection's min share")
        ax.plot(steps, [max(hi[t][i] for t in targets) for i in range(len(steps))], label="max share (all projections)")
    num_experts = len(records[-1]["router_load"][targets[0]])
    ax.axhline(1.0 / num_experts, color="grey", linestyle="--", linewidth=1, label=f"balanced 1/{num_experts}")
    top_k = records[-1].get("router_top_k", 1)  # the collapse threshold is a share of tokens = top_k x load
    ax.axhline(COLLAPSE_MIN_SHARE / top_k, color="red", linestyle="--", linewidth=0.8, label="collapse threshold")
    collapsed = [r["step"] for r in records if r.get("router_collapse")]
    if collapsed:
        ax.plot(collapsed, [0.0] * len(collapsed), "rx", label="collapse reported")
    _finish(ax, "router load", "share of routed assignments")


def _router_entropy(ax, records: list[dict]) -> None:
    steps = [r["step"] for r in records]
    targets = list(records[-1]["router_entropy"])
    maxes = [r.get("router_entropy_max") or 1.0 for r in records]
    norm = {t: [r["router_entropy"].get(t, float("nan")) / m for r, m in zip(records, maxes)] for t in targets}
    if len(targets) <= MAX_LINES_PER_PROJECTION:
        for i, t in enumerate(targets):
            ax.plot(steps, norm[t], color=f"C{i % 10}", label=_short(t))
    else:
        for name, fn in (("min", min), ("median", statistics.median), ("max", max)):
            ax.plot(steps, [fn(norm[t][i] for t in targets) for i in range(len(steps))], label=f"{name} over projections")
    ax.set_ylim(bottom=0)
    _finish(ax, "router entropy", "entropy / log E")


def plot_metrics_file(metrics: str | Path, out: str | Path):
    """Draw `metrics` (a metrics.jsonl) into the PNG `out`; returns the figure."""
    path = Path(metrics)
    if not path.is_file():
        raise InputNotFoundError(f"metrics file not found: {path}")
    fig = plot_metrics(load_metrics(path), title=str(path))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return fig
