"""Run reports: the result table (text and markdown) and plots of a pipeline run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tdcompress.planning import CompressionPlan
from tdcompress.train.checkpoint import atomic_write_text

__all__ = ["pyplot", "result_table", "save_figure", "write_report"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is
    not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def command_block(command: str, intro: str = "Command (from the repository root):") -> list[str]:
    """Markdown lines that show how a result page was produced: ``intro``, then ``command``
    as a code block, then a blank line."""
    return [intro, "", "```", command, "```", ""]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def result_table(r: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the final comparison."""
    fmt = r.get("format", "tt").upper()
    rows = [
        ("dense accuracy", _pct(r.get("dense_acc"))),
        ("dense parameters", f"{r['dense_params']:,}" if r.get("dense_params") else "-"),
        ("ADMM-trained dense accuracy", _pct(r.get("admm_acc"))),
        (f"{fmt} accuracy before fine-tuning", _pct(r.get("decomposed_acc"))),
        (f"{fmt} accuracy after fine-tuning", _pct(r.get("finetuned_acc"))),
        (f"{fmt} parameters", f"{r['compressed_params']:,}" if r.get("compressed_params") else "-"),
        ("whole-model compression ratio", f"{r['ratio']:.2f}x" if r.get("ratio") else "-"),
        ("compressed layers only", f"{r['layers_ratio']:.2f}x" if r.get("layers_ratio") else "-"),
        ("MAC reduction", f"{r['macs_reduction']:.2f}x" if r.get("macs_reduction") else "-"),
    ]
    if r.get("test"):  # data.final_test: the test set, measured once at the end
        rows.append(("test set: dense accuracy", _pct(r["test"]["dense_acc"])))
        rows.append(
            (f"test set: {fmt} accuracy after fine-tuning", _pct(r["test"]["finetuned_acc"]))
        )
    return rows


def _text_table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows)


def write_report(
    out: Path,
    result: dict[str, Any],
    metrics: list[dict[str, Any]],
    plan: CompressionPlan,
    cfg: Any,
) -> str:
    """Write ``report.md`` (+ plots when matplotlib is installed) into ``out``; returns the
    plain-text result table."""
    out = Path(out)
    rows = result_table(result)
    md = [f"# Compression report: {cfg.name}", "", "| | |", "|---|---|"]
    md += [f"| {a} | {b} |" for a, b in rows]
    md += ["", "## Plan", "", "```", plan.summary(), "```", ""]
    plots = _plots(out, metrics, plan)
    for p in plots:
        md.append(f"![{p.stem}]({p.name})")
    md += [
        "",
        "Metrics per epoch: `metrics.jsonl`; the plan: `plan.yaml`; the config: `config.json`.",
    ]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return _text_table(rows)


def _loss_label(phase: str, rec: dict[str, Any]) -> str:
    """A phase's legend entry, naming the label smoothing its training loss (the logged
    cross-entropy, distillation term excluded) used: the test loss is plain CE, so a
    smoothed training loss sits above it without overfitting."""
    ls = rec.get("label_smoothing")
    return f"{phase} (label smoothing {ls:g})" if ls else phase


def _plots(out: Path, metrics: list[dict[str, Any]], plan: CompressionPlan) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    if metrics:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        x = 0
        for phase in ("dense", "admm", "finetune"):
            recs = [m for m in metrics if m.get("phase") == phase]
            if not recs:
                continue
            xs = list(range(x + 1, x + len(recs) + 1))
            ax[0].plot(xs, [m["train_loss"] for m in recs], label=_loss_label(phase, recs[-1]))
            ax[1].plot(xs, [100 * m["test_acc"] for m in recs], label=phase)
            x += len(recs)
        ax[0].set(xlabel="epoch (all phases)", ylabel="training loss", yscale="log")
        ax[1].set(xlabel="epoch (all phases)", ylabel="test accuracy (%)")
        for a in ax:
            a.legend()
            a.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(save_figure(fig, out / "curves.png"))
        recs = [m for m in metrics if m.get("phase") == "admm"]
        keys = sorted({k for m in recs for k in m if k.startswith("admm/primal/")})
        if keys:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for k in keys:
                ax.plot(
                    [m["epoch"] for m in recs], [m[k] for m in recs], label=k[len("admm/primal/") :]
                )
            ax.set(xlabel="ADMM epoch", ylabel="||W - Z|| / ||W||", yscale="log")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths.append(save_figure(fig, out / "admm_residuals.png"))
    if len(plan):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        names = [lp.name for lp in plan]
        ax[0].bar(names, [max(lp.spec.ranks) for lp in plan])
        ax[0].set(ylabel="max rank per layer")
        ax[1].bar(names, [lp.dense_params / max(1, lp.params) for lp in plan])
        ax[1].set(ylabel="layer compression (x)", yscale="log")
        for a in ax:
            a.tick_params(axis="x", rotation=70, labelsize=7)
        fig.tight_layout()
        paths.append(save_figure(fig, out / "ranks.png"))
    return paths
