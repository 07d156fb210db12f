"""Observability: metrics sinks (metrics.jsonl, TensorBoard), router collapse detection, and
the `plot` command."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from medcare_dist.training import metrics as reporting
from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.config import ConfigError
from medcare_dist.method.molora import MoLoRA, Routing
from medcare_dist.method.router_health import COLLAPSE_MIN_SHARE, COLLAPSE_WINDOW, CollapseDetector
from medcare_dist.method.objective import Objective
from medcare_dist.training.metrics import MetricsReporter

TARGETS = [f"model.layers.{layer}.mlp.{proj}" for layer in range(2) for proj in ("gate_proj", "up_proj", "down_proj")]


def stage1_records(steps=12, collapse_from=None):
    """Synthetic stage-1 records: falling loss, warmup+decay lr, 4 experts; from step
    `collapse_from` on expert 3 of the first projection gets almost nothing."""
    out = []
    for step in range(1, steps + 1):
        load = {t: [0.25, 0.25, 0.25, 0.25] for t in TARGETS}
        load[TARGETS[1]] = [0.4, 0.3, 0.2, 0.1]
        if collapse_from is not None and step >= collapse_from:
            load[TARGETS[0]] = [0.4, 0.35, 0.248, 0.002]
        rec = {"step": step, "epoch": 0, "loss": 8.0 - 0.3 * step, "loss_lm": 8.0 - 0.3 * step, "lr": min(step, 3) * 1e-4,
               "grad_norm": 1.0 / step, "tokens_per_s": 900.0 + 10 * step, "router_load": load,
               "router_entropy": {t: round(-sum(f * __import__("math").log(f) for f in v if f > 0), 4) for t, v in load.items()},
               "router_entropy_max": 1.3863, "router_top_k": 2}
        out.append(rec)
    return out


def stage2_records(steps=10):
    return [{"step": s, "epoch": 0, "loss": 6.0 - 0.2 * s + 0.5 / s, "loss_lm": 6.0 - 0.2 * s, "loss_ortho": 0.5 / s,
             "ortho_penalty": 0.5 / s, "lr": 2e-4, "grad_norm": 0.5, "tokens_per_s": 1200.0} for s in range(1, steps + 1)]


# ---------------------------------------------------------------------- collapse detection


def test_collapse_fires_after_the_window_and_not_on_balanced_loads():
    balanced = CollapseDetector()
    for _ in range(10):
        assert balanced.update({"a": [0.25, 0.25, 0.25, 0.25], "b": [0.4, 0.3, 0.2, 0.1]}) == {}
        assert balanced.newly_collapsed == {}

    det = CollapseDetector(min_share=0.01, window=3)
    steps = [
        ([0.5, 0.495, 0.005, 0.0], {}, {}),
        ([0.5, 0.5, 0.0, 0.0], {}, {}),
        ([0.5, 0.3, 0.2, 0.0], {"a": [3]}, {"a": [3]}),  # expert 3: third low interval in a row; expert 2 recovers
        ([0.6, 0.395, 0.005, 0.0], {"a": [3]}, {}),  # still collapsed, warned already
        ([0.6, 0.4, 0.0, 0.0], {"a": [3]}, {}),
        ([0.6, 0.4, 0.0, 0.0], {"a": [2, 3]}, {"a": [2]}),  # expert 2: three in a row since its recovery
        ([0.25, 0.25, 0.25, 0.25], {}, {}),  # recovered
    ]
    for shares, collapsed, newly in steps:
        assert det.update({"a": shares}) == collapsed
        assert det.newly_collapsed == newly

    det = CollapseDetector(min_share=0.01, window=3)
    for shares in ([0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]):
        got = det.update({"a": shares})
    assert got == {"a": [2, 3]}  # an interval that routed nothing neither counts nor resets

    # the defaults: under COLLAPSE_MIN_SHARE for COLLAPSE_WINDOW intervals, not one fewer
    det = CollapseDetector()
    low = [1 - COLLAPSE_MIN_SHARE / 2, COLLAPSE_MIN_SHARE / 2]
    assert [bool(det.update({"a": low})) for _ in range(COLLAPSE_WINDOW + 1)] == [False] * (COLLAPSE_WINDOW - 1) + [True, True]


def _router_objective(num_experts=4, top_k=2):
    from medcare_dist.method.stage1 import RouterObjective

    adapters = AdapterSet()
    for t in TARGETS[:2]:
        adapters.add("molora", t, MoLoRA(8, 8, rank=2, shared_rank=4, num_experts=num_experts, top_k=top_k, scale=2.0))
    return RouterObjective(adapters)


def _route(objective, counts: dict[str, list[int]]):
    """Each layer routes tokens so that expert e gets counts[e] assignments (a forward, as seen
    by the objective), then one log interval's metrics (one rank: the sum is the identity)."""
    for target, layer in objective.layers:
        experts = torch.repeat_interleave(torch.arange(len(counts[target])), torch.tensor(counts[target]))
        top_idx = experts.reshape(-1, layer.top_k)
        layer.last_routing = Routing(probs=torch.full((len(top_idx), layer.num_experts), 1 / layer.num_experts), top_idx=top_idx)
    objective.batch_losses(torch.ones(len(top_idx), dtype=torch.bool))
    return objective.metrics(lambda values: values)


def test_router_metrics_record_and_warn_once_on_collapse():
    objective = _router_objective()
    records = []
    notices = []
    for interval in range(5):
        # expert 3: 0.2% of assignments; each interval a fresh window (the same load again)
        records.append(_route(objective, {TARGETS[0]: [500, 300, 198, 2], TARGETS[1]: [250, 250, 250, 250]}))
        notices += objective.notices()
    assert records[0]["router_load"][TARGETS[0]] == [0.5, 0.3, 0.198, 0.002] and records[0]["router_top_k"] == 2
    assert ["router_collapse" in r for r in records] == [False, False, True, True, True]
    assert records[2]["router_collapse"] == {TARGETS[0]: [3]}
    assert len(notices) == 1 and "router collapse" in notices[0] and f"{TARGETS[0]}: expert(s) 3 (load 0.0020)" in notices[0]

    balanced = _router_objective()
    for _ in range(5):
        assert "router_collapse" not in _route(balanced, {t: [260, 240, 255, 245] for t in TARGETS[:2]})
        assert balanced.notices() == []


def test_collapse_threshold_is_a_share_of_tokens_not_of_assignments():
    # 0.6% of the assignments with top-2 routing is 1.2% of the tokens: not collapsed
    objective = _router_objective(top_k=2)
    for _ in range(4):
        assert "router_collapse" not in _route(objective, {t: [500, 300, 194, 6] for t in TARGETS[:2]})
    # the same load with top-1 routing is 0.6% of the tokens: collapsed after the window
    objective = _router_objective(top_k=1)
    for _ in range(3):
        got = _route(objective, {TARGETS[0]: [500, 300, 194, 6], TARGETS[1]: [250, 250, 250, 250]}).get("router_collapse")
    assert got == {TARGETS[0]: [3]}


# ---------------------------------------------------------------------- sinks


def test_tensorboard_events_are_written_and_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = stage1_records(steps=5, collapse_from=1)
    objective_like = CollapseDetector()
    for r in records:
        collapsed = objective_like.update({t: [2 * f for f in v] for t, v in r["router_load"].items()})
        if collapsed:
            r["router_collapse"] = collapsed
    reporter = MetricsReporter(tmp_path, ["tensorboard"])
    for r in records:
        reporter.write(r)
    # readable while the run is still going (flushed after each record), and after close
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/loss_lm", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/epoch",
                "train/router_entropy_max", "router/collapsed_experts",
                *(f"router_load/{t}/expert_{e}" for t in TARGETS for e in range(4)),
                *(f"router_entropy/{t}" for t in TARGETS)}
    assert expected <= tags, expected - tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert [e.value for e in acc.Scalars(f"router_load/{TARGETS[1]}/expert_3")] == pytest.approx([0.1] * 5)
    assert [e.value for e in acc.Scalars("router/collapsed_experts")] == [0, 0, 1, 1, 1]
    reporter.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_trainer_log_metrics_goes_through_the_sinks_on_rank_0_only(tmp_path):
    from medcare_dist.training.trainer import Trainer

    lines = []
    main = SimpleNamespace(world=SimpleNamespace(is_main=True), reporter=MetricsReporter(tmp_path / "r0", ["tensorboard"]),
                           log=lines.append, num_steps=10, objective=Objective())
    other = SimpleNamespace(world=SimpleNamespace(is_main=False), objective=Objective(),
                            reporter=MetricsReporter(tmp_path / "r1", ["tensorboard"], enabled=False), log=lines.append, num_steps=10)
    for rec in stage2_records(3):
        Trainer._log_metrics(main, rec)
        Trainer._log_metrics(other, rec)
    assert len((tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()) == 3
    assert list((tmp_path / "r0" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "r1").exists()
    assert len(lines) == 3 and lines[0].startswith("step 1/10 loss=") and "loss_ortho=" in lines[0]


def test_report_to_is_checked_at_startup(tmp_path, monkeypatch):
    assert reporting.check_report_to([]) == [] and reporting.check_report_to(["none"]) == ["none"]
    with pytest.raises(ConfigError, match="unknown 'wandb'"):
        MetricsReporter(tmp_path, ["wandb"])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"report_to tensorboard needs the tensorboard package.*pip install"):
        MetricsReporter(tmp_path, ["tensorboard"], enabled=False)  # on every rank, not only rank 0
    MetricsReporter(tmp_path, [])  # metrics.jsonl alone needs nothing


# ---------------------------------------------------------------------- plot


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _check_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 800
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas


def _axes(fig):
    return {ax.get_title(): ax for ax in fig.axes}


def test_plot_stage1_metrics(tmp_path):
    from medcare_dist.cli import main
    from medcare_dist.tools.plotting import load_metrics, plot_metrics

    records = stage1_records(steps=12, collapse_from=4)
    for r in records[6:]:
        r["router_collapse"] = {TARGETS[0]: [3]}
    metrics = _write(tmp_path / "metrics.jsonl", records)
    assert main(["plot", str(metrics), "--out", str(tmp_path / "plots" / "run.png")]) == 0
    _check_png(tmp_path / "plots" / "run.png")

    axes = _axes(plot_metrics(load_metrics(metrics)))
    assert list(axes) == ["loss", "learning rate", "tokens/s", "router load", "router entropy"]
    labels = lambda name: [line.get_label() for line in axes[name].get_lines()]  # noqa: E731
    assert labels("loss") == ["loss (total)"]  # loss_lm is the same curve in stage 1 without the aux loss
    assert labels("learning rate") == ["lr"] and labels("tokens/s") == ["tokens/s"]
    router = labels("router load")
    assert [f"L{i // 3}.{t.split('.')[-1]} {m}" for i, t in enumerate(TARGETS) for m in ("min", "max")] == router[:12]
    assert "balanced 1/4" in router and "collapse threshold" in router and "collapse reported" in router
    min_line = axes["router load"].get_lines()[0]  # L0.gate_proj min: 0.25, then the collapsed expert's 0.002
    assert list(min_line.get_xdata()) == list(range(1, 13)) and min_line.get_ydata()[-1] == pytest.approx(0.002)
    assert len(labels("router entropy")) == 6


def test_plot_stage2_metrics_shows_both_loss_parts_and_no_router(tmp_path):
    from medcare_dist.tools.plotting import load_metrics, plot_metrics_file

    records = stage2_records(10)
    metrics = _write(tmp_path / "metrics.jsonl", records[:8] + records[5:])  # a resume re-logs steps 6-8
    assert [r["step"] for r in load_metrics(metrics)] == list(range(1, 11))
    fig = plot_metrics_file(metrics, tmp_path / "s2.png")
    _check_png(tmp_path / "s2.png")
    axes = _axes(fig)
    assert list(axes) == ["loss", "LM loss", "auxiliary losses", "learning rate", "tokens/s"]
    assert [line.get_label() for line in axes["loss"].get_lines()] == ["loss (total)", "loss_lm"]
    assert [line.get_label() for line in axes["LM loss"].get_lines()] == ["loss_lm"]
    assert [line.get_label() for line in axes["auxiliary losses"].get_lines()] == ["loss_ortho"]
    assert list(axes["auxiliary losses"].get_lines()[0].get_ydata()) == pytest.approx([0.5 / s for s in range(1, 11)])


def test_plot_many_projections_summarises_and_rejects_bad_files(tmp_path):
    from medcare_dist.cli import main
    from medcare_dist.tools.plotting import plot_metrics

    wide = [{"step": s, "router_load": {f"model.layers.{i}.mlp.up_proj": [0.5, 0.3, 0.2] for i in range(10)},
             "router_entropy": {f"model.layers.{i}.mlp.up_proj": 1.0 for i in range(10)}} for s in range(1, 4)]
    axes = _axes(plot_metrics(wide))
    assert list(axes) == ["router load", "router entropy"]
    assert [line.get_label() for line in axes["router load"].get_lines()][:3] == [
        "min share (all projections)", "median projection's min share", "max share (all projections)"]
    assert main(["plot", str(_write(tmp_path / "bad.jsonl", [{"no": "step"}])), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["plot", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
