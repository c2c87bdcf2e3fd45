"""The evaluation report: metrics.json, report.md, the PNG plots, and the plain-text table.

    python -m recsys_ray.evaluate artifacts/eval/metrics.json     # print the table again
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recsys_ray import storage
from recsys_ray.evaluate.metrics import DEFAULT_KS, HEADLINE


def _fmt(model: dict, key: str) -> str:
    m, s = model["mean"].get(key), model["std"].get(key)
    if m is None:
        return "-"
    return f"{m:.4f} ± {s:.4f}" if model["seeds"] > 1 else f"{m:.4f}"


def write_report(result: dict, out: Path) -> dict[str, str]:
    """metrics.json, report.md and the PNG plots; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    # insertion order kept (baselines first, then the models): the table reads the same from the file
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(result))
    files = {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")}
    full = {k: v for k, v in result["models"].items() if v["protocol"] == "full"}
    for metric in ("ndcg", "hr"):
        files[f"{metric}_at_k"] = str(plot_at_k(full, metric, result["num_users"], out / f"{metric}_at_k.png"))
    files["headline_png"] = str(plot_headline(full, out / "headline.png"))
    return files


def report_markdown(result: dict) -> str:
    """report.md: the full-ranking table, the labelled sampled table, notes, per-seed lines."""
    models = result["models"]
    full = {k: v for k, v in models.items() if v["protocol"] == "full"}
    # NDCG@10 and HR@10 lead the table; the other cut-offs follow (recall@K = HR@K: one positive)
    cols = [f"{m}@{k}" for m in ("ndcg", "hr", "mrr", "recall") for k in DEFAULT_KS if f"{m}@{k}" not in HEADLINE]
    lines = [
        f"# Offline evaluation: {result['data']}",
        "",
        f"Protocol: leave-last-out, **full ranking** over {result['num_items']} items, each user's "
        f"train+validation items masked; {result['num_users']} test users; ties pessimistic. "
        "Mean ± sample std over training seeds where a model has several.",
        "",
        "| model | seeds | NDCG@10 | HR@10 | MRR | " + " | ".join(cols) + " |",
        "|---|---|---|---|---|" + "---|" * len(cols),
    ]
    for name, m in full.items():
        lines.append(f"| {name} | {m['seeds']} | {_fmt(m, 'ndcg@10')} | {_fmt(m, 'hr@10')} | {_fmt(m, 'mrr')} | "
                     + " | ".join(_fmt(m, c) for c in cols) + " |")
    sampled = {k: v for k, v in models.items() if v["protocol"] != "full"}
    if sampled:
        lines += ["", "Sampled protocol (1 positive + 99 uniform unseen items; inflates every number, "
                  "not comparable with the table above):", "",
                  "| model | protocol | seeds | NDCG@10 | HR@10 |", "|---|---|---|---|---|"]
        for name, m in sampled.items():
            lines.append(f"| {name} | {m['protocol']} | {m['seeds']} | {_fmt(m, 'ndcg@10')} | {_fmt(m, 'hr@10')} |")
    if result.get("notes"):
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    lines += ["", "Per seed:", ""]
    for name, m in models.items():
        for i, ps in enumerate(m.get("per_seed", [])):
            where = m["checkpoints"][i] if m.get("checkpoints") else "-"
            lines.append(f"- {name} [{where}]: NDCG@10 {ps['ndcg@10']:.4f}, HR@10 {ps['hr@10']:.4f}")
    lines += ["", "![NDCG@K](ndcg_at_k.png) ![HR@K](hr_at_k.png) ![headline](headline.png)", ""]
    return "\n".join(lines)


def plot_at_k(full: dict[str, dict], metric: str, num_users: int, path: Path) -> Path:
    """``metric``@K for K in the cut-offs, one line per model (error bars: std over seeds)."""
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, m in full.items():
        ys = [m["mean"][f"{metric}@{k}"] for k in DEFAULT_KS]
        es = [m["std"][f"{metric}@{k}"] for k in DEFAULT_KS]
        ax.errorbar(DEFAULT_KS, ys, yerr=es if m["seeds"] > 1 else None, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(DEFAULT_KS, [str(k) for k in DEFAULT_KS])
    ax.set_xlabel("K")
    ax.set_ylabel(f"{metric.upper()}@K")
    ax.set_title(f"{metric.upper()}@K, full ranking ({num_users} test users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_headline(full: dict[str, dict], path: Path) -> Path:
    """Bars of the headline metrics per model."""
    fig = Figure(figsize=(max(6.4, 1.3 * len(full) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(full)
    x = np.arange(len(names))
    for i, key in enumerate(HEADLINE):
        ys = [full[n]["mean"][key] for n in names]
        es = [full[n]["std"][key] if full[n]["seeds"] > 1 else 0.0 for n in names]
        bars = ax.bar(x + (i - 0.5) * 0.38, ys, 0.38, yerr=es if any(es) else None, capsize=3, label=key.upper())
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("test metric")
    ax.set_title("Headline metrics, full ranking (error bars: std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def format_table(result: dict) -> str:
    """The headline table as plain text (what `make demo` prints)."""
    rows = [(n, m) for n, m in result["models"].items()]
    width = max(len(n) for n, _ in rows)
    lines = [f"test metrics, {result['num_users']} users, leave-last-out ({'; '.join(sorted({m['protocol'] for _, m in rows}))}):",
             f"  {'model':<{width}}  {'protocol':<14} {'NDCG@10':>17} {'HR@10':>17} {'MRR':>8}"]
    for n, m in rows:
        lines.append(f"  {n:<{width}}  {m['protocol']:<14} {_fmt(m, 'ndcg@10'):>17} {_fmt(m, 'hr@10'):>17} "
                     f"{m['mean'].get('mrr', float('nan')):>8.4f}")
    return "\n".join(lines)


def main_table(path: str | os.PathLike) -> str:
    """The table of a metrics.json (``python -m recsys_ray.evaluate artifacts/eval/metrics.json``)."""
    return format_table(json.loads(Path(path).read_text()))


def finish_report(result: dict, output: str) -> dict:
    """Write a per-row table's report; ``{"summary", "result"}`` with every row's NDCG@10 / HR@10 as headline."""
    files = save_report(result, output)
    summary = {"output": output, **files, "seconds": result["seconds"],
               "headline": {n: {"ndcg@10": round(m["mean"]["ndcg@10"], 4), "hr@10": round(m["mean"]["hr@10"], 4)}
                            for n, m in result["models"].items()}}
    return {"summary": summary, "result": result}


def save_report(result: dict, output: str) -> dict[str, str]:
    """:func:`write_report` into ``output``, a local folder or a URI (written locally, uploaded)."""
    if not storage.is_remote(output):
        return write_report(result, Path(output))
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(result, Path(tmp))
        storage.upload_dir(tmp, output)
    return {k: storage.join(output, Path(v).name) for k, v in files.items()}
