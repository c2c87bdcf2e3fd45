"""The report of a Ray Tune sweep: every trial in one table, its curves, the winner as a config.

    python jobs/tune.py --report-only artifacts/tune/tune-tiny

Reads only what the sweep stored - Tune's experiment state and each trial's results through
``ray.tune.ExperimentAnalysis``, plus the sweep's ``sweep.yaml`` - so it works on a finished, an
interrupted or a running sweep, without Ray and without re-running a trial. Writes
``<experiment>/report/``:

- ``report.md``: all trials sorted by the metric (trial, searched values, best metric and its
  epoch, epochs run, completed / stopped early by ASHA / errored, checkpoint);
- ``curves.png``: the validation metric per epoch of every trial (ASHA-stopped trials end early);
- ``metric_vs_lr.png``: best metric vs learning rate (log x), coloured by loss;
- ``metric_by_freeze.png``: best metric per freeze strategy;
- ``best_config.yaml``: the best trial's whole training config, for ``jobs/train.py --config``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter
from ray.tune import ExperimentAnalysis

from recsys_ray import storage
from recsys_ray.config import to_dict
from recsys_ray.errors import RecsysError, one_line
from recsys_ray.model.losses import LOSSES
from recsys_ray.tune.config import (
    REPORT_DIR,
    SweepConfig,
    apply_params,
    load_saved_sweep,
    param_path,
)

_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
LOSS_COLORS = dict(zip(LOSSES, _PALETTE, strict=False))  # one colour per loss of the registry
COMPLETED, STOPPED, ERRORED, UNFINISHED = "completed", "stopped early (ASHA)", "errored", "unfinished"
PATIENCE = "stopped early (own early_stopping)"  # the trial's run ended itself: validation stopped improving


@dataclasses.dataclass
class TrialRecord:
    """One trial as the report sees it."""

    trial_id: str
    status: str  # COMPLETED | STOPPED | PATIENCE | ERRORED | UNFINISHED
    tune_status: str  # Tune's own status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED)
    params: dict  # the sampled values, by space key
    train: dict  # the trial's whole training config
    curve: list[tuple[int, float]]  # (epoch, metric) per epoch reported
    checkpoints: dict[int, str]  # epoch -> checkpoint path reported with it
    error: str | None = None  # first useful line of the trial's error

    def best(self, mode: str) -> tuple[int, float] | None:
        """(epoch, value) of the best epoch, None when the trial reported nothing."""
        points = [(e, v) for e, v in self.curve if not math.isnan(v)]
        if not points:
            return None
        return (max if mode == "max" else min)(points, key=lambda p: p[1])

    @property
    def epochs_run(self) -> int:
        return max((e for e, _ in self.curve), default=0)

    def checkpoint(self, mode: str) -> str | None:
        """The checkpoint of the best epoch; if Ray Train pruned it, the newest one that exists."""
        best = self.best(mode)
        order = ([best[0]] if best else []) + sorted(self.checkpoints, reverse=True)
        for epoch in order:
            path = self.checkpoints.get(epoch)
            if path and ("://" in path or Path(path).is_dir()):
                return path
        return None


def _error_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    ours = [ln for ln in lines if "RecsysError" in ln or " failed: " in ln]
    line = (ours or lines or [""])[-1]
    return line.split("RecsysError: ")[-1][:300]


def _stopped_itself(df) -> bool:
    """Whether the trial's run reported ``stopped_early`` (train ``early_stopping``) on some epoch."""
    if df is None or df.empty or "stopped_early" not in df:
        return False
    return bool(df["stopped_early"].eq(1).any())


def _curve(df, metric: str) -> tuple[list[tuple[int, float]], dict[int, str]]:
    """Per-epoch points from a trial's results: the last row of each epoch wins (a trial resumed
    from scratch reports its first epochs again); mid-epoch checkpoints (not validated) are skipped."""
    if df is None or df.empty or "epoch" not in df or metric not in df:
        return [], {}
    points: dict[int, float] = {}
    ckpts: dict[int, str] = {}
    for row in df.to_dict("records"):
        epoch = row.get("epoch")
        if epoch is None or (isinstance(epoch, float) and math.isnan(epoch)) or int(epoch) < 1:
            continue
        value = row.get(metric)
        if row.get("validated") is False or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue  # a mid-epoch checkpoint's report: not validated, no metric to plot
        points[int(epoch)] = float(value)
        path = row.get("checkpoint_path")
        if isinstance(path, str) and path:
            ckpts[int(epoch)] = path
    return sorted(points.items()), ckpts


def collect_trials(path: str, sweep: SweepConfig) -> list[TrialRecord]:
    """Every trial of the sweep stored at ``path``, with its curve and status."""
    try:
        target, fs = storage.ray_target(path)
        analysis = ExperimentAnalysis(target, storage_filesystem=fs)
    except (ValueError, FileNotFoundError) as exc:
        raise RecsysError(f"{path}: cannot read the sweep's results ({one_line(exc)})") from None
    metric, max_epochs = sweep.tune.metric, sweep.train.epochs
    base = to_dict(sweep.train)
    keys = list(sweep.tune.search_space)
    out = []
    for trial in analysis.trials:
        params = {k: trial.config[k] for k in keys if k in trial.config}
        df = analysis.trial_dataframes.get(trial.trial_id)
        curve, ckpts = _curve(df, metric)
        ckpts = {e: storage.uri_of(path, p) for e, p in ckpts.items()}  # Ray reports paths inside its fs
        status = trial.status
        epochs = max((e for e, _ in curve), default=0)
        if status == "ERROR":
            kind = ERRORED
        elif status == "TERMINATED" and _stopped_itself(df):
            kind = PATIENCE  # its own early stopping, which ASHA's "fewer epochs than max_t" would hide
        elif status == "TERMINATED":
            kind = COMPLETED if epochs >= max_epochs or sweep.tune.scheduler != "asha" else STOPPED
        else:
            kind = UNFINISHED
        error = None
        if kind == ERRORED:
            try:
                error = _error_line(trial.get_error())
            except Exception:  # a missing or unreadable error file: the status says enough
                error = None
        out.append(TrialRecord(trial.trial_id, kind, status, params, apply_params(base, params), curve, ckpts, error))
    return out


def _sorted(trials: list[TrialRecord], mode: str) -> list[TrialRecord]:
    def key(t: TrialRecord):
        b = t.best(mode)
        if b is None:
            return (1, 0.0, t.trial_id)
        return (0, -b[1] if mode == "max" else b[1], t.trial_id)

    return sorted(trials, key=key)


def _value(train: dict, key: str):
    node = train
    for part in param_path(key).split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return None if node == {} else node


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's object API on the Agg canvas: no pyplot state, no display needed)


def _figure(width: float = 7.5, height: float = 4.5):
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _label(t: TrialRecord) -> str:
    short = t.trial_id.rsplit("_", 1)[-1]
    lr = _value(t.train, "lr")
    return f"{short} {t.train.get('loss')} / {_value(t.train, 'freeze')} / lr {lr:.1e}"


def plot_curves(trials: list[TrialRecord], metric: str, max_epochs: int, out: Path) -> None:
    fig, ax = _figure(10.0, 5.0)
    cmap = _trial_colors(len(trials))
    for i, t in enumerate(trials):
        if not t.curve:
            continue
        xs, ys = zip(*t.curve, strict=True)
        stopped = t.status == STOPPED
        label = _label(t) + (" (stopped)" if stopped else "" if t.status == COMPLETED else f" ({t.status})")
        ax.plot(xs, ys, "--" if stopped else "-", marker="o", markersize=4, color=cmap[i], alpha=0.9, label=label)
        if stopped:  # the trial's colour, so a one-epoch trial is not just an anonymous cross
            ax.plot(xs[-1], ys[-1], "X", color=cmap[i], markeredgecolor="black", markersize=9, zorder=5)
    ax.set_xticks(range(1, max_epochs + 1))
    ax.set_xlim(0.8, max_epochs + 0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"validation {metric} per epoch (dashed, x = stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="trial: loss / freeze / lr", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out)


def _trial_colors(n: int) -> list:
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    # tab20 pairs a dark and a light shade of each hue: all dark ones first, then the light ones
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [colormaps["tab20"](order[i % 20]) for i in range(n)]


def _loss_legend(ax, losses: set, with_stopped: bool) -> None:
    """Legend by loss colour (circles), plus what a triangle means."""

    handles = [Line2D([], [], marker="o", linestyle="", color=LOSS_COLORS.get(loss, "tab:gray"),
                      markeredgecolor="black", label=str(loss)) for loss in sorted(losses, key=str)]
    if with_stopped:
        handles.append(Line2D([], [], marker="v", linestyle="", color="white", markeredgecolor="black",
                              label="stopped early"))
    if handles:
        ax.legend(handles=handles, title="loss", fontsize=8)


def plot_metric_vs_lr(trials: list[TrialRecord], metric: str, mode: str, out: Path) -> None:
    fig, ax = _figure()
    seen = set()
    for t in trials:
        b = t.best(mode)
        if b is None:
            continue
        loss = t.train.get("loss")
        marker = "v" if t.status == STOPPED else "o"
        ax.scatter(_value(t.train, "lr"), b[1], color=LOSS_COLORS.get(loss, "tab:gray"), marker=marker, s=40,
                   edgecolor="black", linewidth=0.5, zorder=3)
        seen.add(loss)
    ax.set_xscale("log")

    ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-4, 3x10^-4 ... labels overlap
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"best validation {metric}")
    ax.set_title(f"best {metric} vs learning rate, colour = loss")
    ax.grid(alpha=0.3, which="both")
    _loss_legend(ax, seen, any(t.status == STOPPED for t in trials))
    fig.tight_layout()
    fig.savefig(out)


def plot_metric_by_freeze(trials: list[TrialRecord], metric: str, mode: str, out: Path) -> None:
    fig, ax = _figure()
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.best(mode) is not None:
            groups.setdefault(str(_value(t.train, "freeze")), []).append(t)
    names = sorted(groups)
    seen = set()
    for i, name in enumerate(names):
        members = groups[name]
        values = [t.best(mode)[1] for t in members]  # type: ignore[index]
        for j, (t, v) in enumerate(zip(members, values, strict=True)):
            jitter = (j - (len(members) - 1) / 2) * min(0.08, 0.5 / max(1, len(members)))  # spread, no randomness
            loss = t.train.get("loss")
            ax.scatter(i + jitter, v, color=LOSS_COLORS.get(loss, "tab:gray"), marker="v" if t.status == STOPPED else "o",
                       s=40, edgecolor="black", linewidth=0.5, zorder=3)
            seen.add(loss)
        best = max(values) if mode == "max" else min(values)
        ax.hlines(best, i - 0.3, i + 0.3, color="black", linewidth=1.2, zorder=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n(n={len(groups[n])})" for n in names], fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("freeze strategy")
    ax.set_ylabel(f"best validation {metric}")
    ax.set_title(f"best {metric} per freeze strategy (bar = best of the group)")
    ax.grid(alpha=0.3, axis="y")
    _loss_legend(ax, seen, any(t.status == STOPPED for t in trials))
    fig.tight_layout()
    fig.savefig(out)


# ---------------------------------------------------------------------------------------------
# the report


def _table(trials: list[TrialRecord], sweep: SweepConfig) -> list[str]:
    metric, mode = sweep.tune.metric, sweep.tune.mode
    extra = [k for k in sweep.tune.search_space if param_path(k) not in ("optim.lr", "loss", "model.freeze")]
    head = ["#", "trial", "lr", "loss", "freeze", *extra, f"best {metric}", "at epoch", f"last {metric}",
            "epochs run", "status", "checkpoint (best epoch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, t in enumerate(trials, 1):
        b = t.best(mode)
        status = t.status + (f": {t.error}" if t.error else "") + (f" ({t.tune_status})" if t.status == UNFINISHED else "")
        row = [
            str(rank), f"`{t.trial_id}`", _fmt(_value(t.train, "lr")), str(t.train.get("loss")), str(_value(t.train, "freeze")),
            *(_fmt(t.params.get(k)) for k in extra),
            f"{b[1]:.4f}" if b else "-", str(b[0]) if b else "-",
            f"{t.curve[-1][1]:.4f}" if t.curve else "-", f"{t.epochs_run} / {sweep.train.epochs}",
            status.replace("|", "/"), f"`{t.checkpoint(mode)}`" if t.checkpoint(mode) else "-",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _best_config_text(best: TrialRecord, sweep: SweepConfig, path: str, value: float, epoch: int) -> str:
    cfg = dict(best.train)
    cfg["storage_path"] = sweep.train.storage_path  # the sweep's per-trial folder is no place for a new run
    cfg["name"] = f"{sweep.tune.name}-best"
    header = (
        f"# Best trial {best.trial_id} of the sweep {path}: {sweep.tune.metric} = {value:.4f} at epoch {epoch}.\n"
        f"# Searched values: {best.params}\n"
        "# Train it (full run, same data):  python jobs/train.py --config <this file>\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False)


def write_report(path: str, out_dir: str | None = None) -> dict:
    """Write report.md, the plots and best_config.yaml for the sweep at ``path``; returns the summary."""
    sweep = load_saved_sweep(path)
    path = storage.absolute(path).rstrip("/")  # where the sweep is now (it may have been moved since)
    metric, mode = sweep.tune.metric, sweep.tune.mode
    trials = _sorted(collect_trials(path, sweep), mode)
    counts = {
        "total": len(trials),
        "completed": sum(t.status == COMPLETED for t in trials),
        "early_stopped": sum(t.status == STOPPED for t in trials),
        "stopped_by_patience": sum(t.status == PATIENCE for t in trials),
        "errored": sum(t.status == ERRORED for t in trials),
        "unfinished": sum(t.status == UNFINISHED for t in trials),
    }
    ranked = [t for t in trials if t.best(mode) is not None]
    best = ranked[0] if ranked else None
    remote = "://" in path or out_dir is not None and "://" in out_dir
    dest = out_dir or storage.join(path, REPORT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if remote else Path(dest)
        local.mkdir(parents=True, exist_ok=True)
        plots = {}
        if ranked:
            plot_curves(trials, metric, sweep.train.epochs, local / "curves.png")
            plot_metric_vs_lr(trials, metric, mode, local / "metric_vs_lr.png")
            plot_metric_by_freeze(trials, metric, mode, local / "metric_by_freeze.png")
            plots = {"curves": "curves.png", "metric_vs_lr": "metric_vs_lr.png", "metric_by_freeze": "metric_by_freeze.png"}
        best_info: dict = {}
        if best is not None:
            epoch, value = best.best(mode)  # type: ignore[misc]
            (local / "best_config.yaml").write_text(_best_config_text(best, sweep, path, value, epoch))
            values = [t.best(mode)[1] for t in ranked]  # type: ignore[index]
            best_info = {
                "best_trial": best.trial_id,
                "best_metric": value,
                "best_epoch": epoch,
                "median_metric": statistics.median(values),
                "best_params": {k: _plain(v) for k, v in best.params.items()},
                "best_loss": best.train.get("loss"),
                "best_freeze": _value(best.train, "freeze"),
                "best_checkpoint": best.checkpoint(mode),
                "best_config": storage.join(dest, "best_config.yaml"),
            }
        (local / "report.md").write_text(_markdown(trials, sweep, path, counts, best_info, plots))
        if remote:
            fs, target = storage.filesystem(dest)
            fs.create_dir(target, recursive=True)
            pafs.copy_files(str(local), target, destination_filesystem=fs)
    return {
        "experiment": path,
        "report": storage.join(dest, "report.md"),
        "metric": metric,
        **best_info,
        "trials": counts,
        "plots": {k: storage.join(dest, v) for k, v in plots.items()},
        "tensorboard": f"tensorboard --logdir {path}",
    }


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _markdown(trials: list[TrialRecord], sweep: SweepConfig, path: str, counts: dict, best: dict, plots: dict) -> str:
    t = sweep.tune
    sched = (f"ASHA on `{t.metric}` ({t.mode}), time = epoch, grace period {t.grace_period}, "
             f"reduction factor {t.reduction_factor}, max_t {sweep.train.epochs}") if t.scheduler == "asha" else "FIFO (no early stopping by Tune)"
    lines = [
        f"# HPO report: {t.name}",
        "",
        f"Sweep `{path}`: {counts['total']} trials ({counts['completed']} completed, {counts['early_stopped']} stopped "
        f"early by ASHA, {counts['stopped_by_patience']} by their own early stopping, {counts['errored']} errored, {counts['unfinished']} unfinished). Search: {t.search_alg} "
        f"(seed {t.seed}), {t.num_samples} samples; scheduler: {sched}. Base training config: data `{sweep.train.data}`, "
        f"model {sweep.train.model.kind}" + (" (tiny random BERT)" if sweep.train.model.tiny else f" (`{sweep.train.model.encoder}`)")
        + f", {sweep.train.epochs} epochs of at most {sweep.train.max_steps_per_epoch or 'all'} steps"
        + (f"; each run's own early stopping on `{es.metric}` (patience {es.patience}, min_delta {es.min_delta:g})."
           if (es := sweep.train.early_stopping).patience else "."),
        "",
        "Search space: " + ", ".join(f"`{k}`: {v}" for k, v in t.search_space.items()),
        "",
    ]
    if best:
        lines += [
            f"**Best trial `{best['best_trial']}`**: {t.metric} = {best['best_metric']:.4f} at epoch {best['best_epoch']} "
            f"(median over trials: {best['median_metric']:.4f}); values {best['best_params']}.",
            f"Checkpoint: `{best['best_checkpoint']}`. Training config: [`best_config.yaml`](best_config.yaml) "
            "(`python jobs/train.py --config` it).",
            "",
        ]
    else:
        lines += ["No trial reported a result yet.", ""]
    lines += [f"## All trials, best {t.metric} first", "", *_table(trials, sweep), ""]
    titles = {"curves": f"Validation {t.metric} per epoch", "metric_vs_lr": f"{t.metric} vs learning rate",
              "metric_by_freeze": f"{t.metric} per freeze strategy"}
    for key, file in plots.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({file})", ""]
    lines += [
        "## Dashboards",
        "",
        f"TensorBoard (every trial's reported metrics): `tensorboard --logdir {path}`.",
        f"Regenerate this report: `python jobs/tune.py --report-only {path}`.",
        "",
    ]
    return "\n".join(lines)
