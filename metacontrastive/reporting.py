"""Results of ``metacontrastive.evaluation`` as files people read: JSON, CSV, a markdown table, a plot, TensorBoard.

``write_results`` writes, into one folder:

- ``results.json``: ``{"settings": {...}, "seconds": float, "results": [row, ...]}``, a row per
  (domain, shots, method) with the keys of ``evaluation.Result`` (``domain``, ``conditioning``,
  ``method``, ``ways``, ``shots``, ``queries``, ``episodes``, ``images``, ``acc``, ``acc_ci95``, ``f1``,
  ``f1_ci95``, ``ms_per_episode``; accuracies are fractions);
- ``results.csv``: the same rows;
- ``results.md``: the table, a row per method and a column per domain x shots, accuracy and macro-F1
  in % with their 95% CIs;
- ``accuracy_vs_shots.png``: accuracy against shots per domain and method, with CI error bars.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import scipy.stats

from metacontrastive.evaluation import Result

__all__ = ["FILES", "log_to_tensorboard", "markdown_table", "mean_over_seeds", "plot_accuracy_vs_shots", "shape",
           "write_results"]

FILES = ("results.json", "results.csv", "results.md", "accuracy_vs_shots.png")


def _columns(results: Sequence[Result]) -> dict[tuple[str, str, int], Result]:
    """The first row of each (domain, conditioning, shots) column, in order of appearance."""
    columns: dict[tuple[str, str, int], Result] = {}
    for r in results:
        columns.setdefault((r.domain, r.conditioning, r.shots), r)
    return columns


EPISODE_CI = "1.96 std / sqrt(episodes)"


def shape(r: Result) -> str:
    """``5-way 5-shot``, or ``2-5-way variable-shot`` for variable-way variable-shot episodes (``shots`` 0)."""
    return f"{r.ways}-way {r.shots}-shot" if r.shots else f"2-{r.ways}-way variable-shot"


def markdown_table(results: Sequence[Result], ci: str = EPISODE_CI) -> str:
    """A row per method, a column per (domain, conditioning, shots): accuracy % +- 95% CI, then macro-F1 % +- CI;
    ``ci`` says in the footer what the interval is."""
    columns = _columns(results)
    by_key = {(r.method, r.domain, r.conditioning, r.shots): r for r in results}
    heads = [f"{domain} {shape(r)}" + ("" if conditioning == domain else f", via {conditioning}")
             for (domain, conditioning, shots), r in columns.items()]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(columns)]
    for method in dict.fromkeys(r.method for r in results):
        cells = []
        for domain, conditioning, shots in columns:
            r = by_key.get((method, domain, conditioning, shots))
            cells.append("" if r is None else f"{100 * r.acc:.1f} ± {100 * r.acc_ci95:.1f} (F1 {100 * r.f1:.1f} ± {100 * r.f1_ci95:.1f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notes = [f"{domain} {shape(r)}: {r.episodes} episodes, {'up to ' if not shots else ''}{r.queries} queries per class, "
             f"{r.images} distinct images, chance {'from ' if not shots else ''}{100 / r.ways:.1f}%"
             for (domain, _, shots), r in columns.items()]  # dict.fromkeys: once each
    return ("\n".join(lines) + f"\n\nAccuracy % ± 95% CI ({ci}), macro-F1 in brackets. "
            + "; ".join(dict.fromkeys(notes)) + ".\n")


def mean_over_seeds(rows: Sequence[Result]) -> list[Result]:
    """One row per (method, domain, shots): the mean over seeds; with several seeds the CI becomes the 95%
    Student-t interval across them (t * std / sqrt(seeds), t = 4.30 for three seeds: a handful of seeds
    says little about the spread, and 1.96 would pretend otherwise). A row that is the same in every seed (one
    seed, or a method that trains nothing) keeps its episode CI."""
    groups: dict[tuple, list[Result]] = {}
    for r in rows:
        groups.setdefault((r.method, r.domain, r.shots), []).append(r)
    out = []
    for group in groups.values():
        if len({(r.acc, r.f1) for r in group}) == 1:
            out.append(group[0])
            continue
        t = scipy.stats.t.ppf(0.975, len(group) - 1)
        ci = {k: t * statistics.stdev(getattr(r, k) for r in group) / len(group) ** 0.5 for k in ("acc", "f1")}
        out.append(dataclasses.replace(group[0], acc=statistics.mean(r.acc for r in group), acc_ci95=ci["acc"],
                                       f1=statistics.mean(r.f1 for r in group), f1_ci95=ci["f1"]))
    return out


def plot_accuracy_vs_shots(results: Sequence[Result], path: str | Path | None = None) -> plt.Figure:
    """One panel per domain: accuracy against shots, a line per method, CI error bars, chance dashed.
    Saved to ``path`` and closed when one is given, else returned open (for a notebook). Variable-shot rows
    (``shots`` 0) have no place on a shots axis and are left out."""
    results = [r for r in results if r.shots]
    panels = list(dict.fromkeys((r.domain, r.conditioning) for r in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (domain, conditioning) in zip(axes[0], panels):
        mine = [r for r in results if (r.domain, r.conditioning) == (domain, conditioning)]
        for method in dict.fromkeys(r.method for r in mine):
            rows = sorted((r for r in mine if r.method == method), key=lambda r: r.shots)
            ax.errorbar([r.shots for r in rows], [100 * r.acc for r in rows], yerr=[100 * r.acc_ci95 for r in rows],
                        marker="o", capsize=3, label=method)
        ax.axhline(100 / mine[0].ways, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(sorted({r.shots for r in mine}))
        via = "" if conditioning == domain else f" (via {conditioning})"
        ax.set_title(f"{domain}{via}, {mine[0].ways}-way")
        ax.set_xlabel("shots")
        ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def write_results(results: Sequence[Result], out: str | Path, settings: dict, seconds: float, note: str = "",
                  ci: str = EPISODE_CI) -> list[Path]:
    """Write the four files of the module docstring into ``out`` (``note`` heads the markdown, ``ci`` names the
    interval); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.as_dict() for r in results]
    (out / "results.json").write_text(json.dumps({"settings": settings, "seconds": seconds, "results": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text((note + "\n\n" if note else "") + markdown_table(results, ci))
    plot_accuracy_vs_shots(results, out / "accuracy_vs_shots.png")
    return [out / name for name in FILES]


def log_to_tensorboard(results: Sequence[Result], log_dir: str | Path, step: int = 0) -> None:
    """The table as text and every accuracy and F1 as a scalar ``evaluate/<domain>/<shots>shot/<method>/acc``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_text("evaluate/results", markdown_table(results), step)
        for r in results:
            for key in ("acc", "f1"):
                kind = f"{r.shots}shot" if r.shots else "variable"
                writer.add_scalar(f"evaluate/{r.domain}/{kind}/{r.method}/{key}", getattr(r, key), step)
