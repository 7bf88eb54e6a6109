"""TT-LSTM on real speech (issue 20): the Free Spoken Digit Dataset, run, collect, report.

Every run is one config in ``configs/fsdd/`` run by ``tdcompress`` with a seed, a protocol
and a run folder set on the command line (the JSON records each run's full command):

- official split (recording index 0-4 test), seeds 0, 1, 2: the dense LSTM; ADMM -> TT of
  the input-to-hidden matrix at 12.6x, 93x, 117x and 819x; at 117x also TT-SVD + fine-tune,
  TT from scratch, tensor ring and low rank (114x each), each with the ADMM run's budget
  (and, seed 0 only, the same four at 82-93x: the first middle ratio, below 100x);
- leave-one-speaker-out (6 folds, seeds 0, 1, 2): dense, ADMM -> TT 117x and its two
  baselines (seeds 1-2 fine-tune through the rebuilt kernel, ``runtime.execution: rebuilt``).

A compressed run starts from the dense run of its seed and fold. Results already recorded
in the JSON are kept when their run folder is gone (run folders are scratch space). This
script runs what is not finished (``--jobs`` at a time, 1 thread each, dense runs first;
every run resumes per epoch after a kill) and collects what has finished into
``benchmarks/results/quality-fsdd.json``, ``docs/results/fsdd.md`` and
``docs/results/fsdd.png``. ``--latency`` also times the seed-0 official models per sequence
(batch 1 and 32, PyTorch eager, 1 thread, medians of interleaved repeats).

    python benchmarks/fsdd.py --run --jobs 2 --data-root DATA   # run (resumes), collect
    python benchmarks/fsdd.py --latency --data-root DATA        # + latency, collect
    python benchmarks/fsdd.py                                   # collect only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from tdcompress.data.speech import SPEAKERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (  # noqa: E402
    done_stages,
    interleaved_latency,
    run_model,
    run_queue,
    run_record,
)
from _runs import finished as run_finished  # noqa: E402
from tdcompress.report import command_block, pyplot, save_figure
from tdcompress.train.checkpoint import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "fsdd"
RESULTS = REPO / "benchmarks" / "results" / "quality-fsdd.json"
PAGE = REPO / "docs" / "results" / "fsdd.md"
FIGURE = REPO / "docs" / "results" / "fsdd.png"
COMMAND = "python benchmarks/fsdd.py --run --latency --jobs 2 --data-root DATA"

# key: (label, method)
METHODS: dict[str, tuple[str, str]] = {
    "dense": ("dense LSTM", "dense"),
    "tt_12x": ("ADMM -> TT, rank 24", "admm"),
    "tt_93x": ("ADMM -> TT, rank 8", "admm"),
    "tt_117x": ("ADMM -> TT, rank 7", "admm"),
    "tt_819x": ("ADMM -> TT, rank 2", "admm"),
    "tt_117x_dtf": ("TT-SVD + fine-tune, rank 7", "dtf"),
    "tt_117x_scratch": ("TT from scratch, rank 7", "scratch"),
    "tr_114x": ("ADMM -> tensor ring, ranks 4-5-4", "admm"),
    "svd_114x": ("ADMM -> low rank, rank 3", "admm"),
    # the first middle ratio (93x), below the 100x: its baselines for seed 0 only
    "tt_93x_dtf": ("TT-SVD + fine-tune, rank 8", "dtf"),
    "tt_93x_scratch": ("TT from scratch, rank 8", "scratch"),
    "tr_82x": ("ADMM -> tensor ring, rank 5", "admm"),
    "svd_85x": ("ADMM -> low rank, rank 4", "admm"),
}
SEEDS = (0, 1, 2)
OFFICIAL_KEYS = (
    "dense",
    "tt_12x",
    "tt_93x",
    "tt_117x",
    "tt_819x",
    "tt_117x_dtf",
    "tt_117x_scratch",
    "tr_114x",
    "svd_114x",
)
FIRST_TRY_KEYS = ("tt_93x_dtf", "tt_93x_scratch", "tr_82x", "svd_85x")  # seed 0 only
SPEAKER_KEYS = ("dense", "tt_117x", "tt_117x_dtf", "tt_117x_scratch")
MATRIX = 1024 * 512  # the dense input-to-hidden matrix (4 gates x 128 hidden, 1,024 inputs)
LSTM_DENSE = 4 * 128 * (1024 + 128) + 2 * 4 * 128  # input and recurrent matrices, two biases


def runs() -> list[dict[str, Any]]:
    """Every run: id, config key, fold ("official" or "speaker-<name>"), seed, out_dir."""
    # in the order they run: seed 0 of the official split, the speaker folds (the protocol
    # that tells methods apart), then the other seeds; dense runs first within each
    out = [dict(key=k, fold="official", seed=0) for k in OFFICIAL_KEYS + FIRST_TRY_KEYS]
    out += [dict(key="dense", fold=f"speaker-{sp}", seed=0) for sp in SPEAKERS]
    for sp in SPEAKERS:
        out += [dict(key=k, fold=f"speaker-{sp}", seed=0) for k in SPEAKER_KEYS[1:]]
    for seed in SEEDS[1:]:
        out += [dict(key=k, fold="official", seed=seed) for k in OFFICIAL_KEYS]
    # seeds 1 and 2 of the speaker folds (added after the first 55 runs): their factorized
    # layers train through the kernel rebuilt from the cores (runtime.execution: rebuilt,
    # the same function and gradients, 4x faster here: benchmarks/bench_train_execution.py)
    for seed in SEEDS[1:]:
        out += [dict(key="dense", fold=f"speaker-{sp}", seed=seed) for sp in SPEAKERS]
        for sp in SPEAKERS:
            out += [
                dict(key=k, fold=f"speaker-{sp}", seed=seed, execution="rebuilt")
                for k in SPEAKER_KEYS[1:]
            ]
    for r in out:
        r["id"] = f"{r['fold']}/s{r['seed']}/{r['key']}"
        r["out_dir"] = f"runs/fsdd/{r['id']}"
        r["dense_dir"] = f"runs/fsdd/{r['fold']}/s{r['seed']}/dense"
    return out


def command(r: dict[str, Any], data_root: str = "DATA") -> list[str]:
    """The ``tdcompress`` command of run ``r`` (from the repository root)."""
    stage = "train" if r["key"] == "dense" else "pipeline"
    cmd = [stage, f"configs/fsdd/{r['key']}.yaml", "--data-root", data_root]
    cmd += ["--out-dir", r["out_dir"], "--set", f"seed={r['seed']}"]
    if r["fold"] != "official":
        cmd += ["--set", "data.protocol=speaker", "--set", f"data.speaker={r['fold'][8:]}"]
    if r["key"] != "dense":
        cmd += ["--set", f"runtime.dense_checkpoint={r['dense_dir']}/dense.pt"]
    if r.get("execution"):
        cmd += ["--set", f"runtime.execution={r['execution']}"]
    return ["tdcompress", *cmd]


def finished(r: dict[str, Any]) -> bool:
    return run_finished(REPO / r["out_dir"], r["key"] == "dense")


def run_all(data_root: str, jobs: int) -> None:
    """Run every unfinished run not recorded in the results JSON (its folder may be gone:
    run folders are scratch space), dense runs before the runs that start from them."""
    by_dir = {r["out_dir"]: r for r in runs()}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    recorded = {r["id"] for r in old.get("runs", [])}
    run_queue(
        [r for r in runs() if r["id"] not in recorded],
        lambda r: command(r, data_root)[1:],
        lambda r: r["key"] == "dense" or finished(by_dir[r["dense_dir"]]),
        finished,
        cwd=REPO,
        log_dir=REPO / "runs" / "fsdd" / "logs",
        jobs=jobs,
        tag="fsdd",
    )


def collect_run(r: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a finished run, or None."""
    if not finished(r):
        return None
    out = REPO / r["out_dir"]
    done = done_stages(out)
    res: dict[str, Any] = {
        "id": r["id"],
        "key": r["key"],
        "label": METHODS[r["key"]][0],
        "method": METHODS[r["key"]][1],
        "fold": r["fold"],
        "seed": r["seed"],
        "config": f"configs/fsdd/{r['key']}.yaml",
        "command": " ".join(command(r)),
        **run_record(out),
    }
    if r["key"] == "dense":
        res.update(
            top1=100 * done["train"]["test_acc"],
            params=done["train"]["params"],
            matrix_params=MATRIX,
            lstm_params=LSTM_DENSE,
        )
        return res
    from tdcompress.planning import CompressionPlan

    ev = done["evaluate"]
    plan = CompressionPlan.load(out / "plan.yaml")
    (lp,) = plan.layers
    res.update(
        top1=100 * ev["finetuned_acc"],
        dense_top1=100 * ev["dense_acc"],
        admm_top1=None if ev["admm_acc"] is None else 100 * ev["admm_acc"],
        params=ev["compressed_params"],
        dense_params=ev["dense_params"],
        ratio=ev["ratio"],
        matrix_params=lp.params,
        matrix_ratio=MATRIX / lp.params,
        lstm_params=LSTM_DENSE - MATRIX + lp.params,
        lstm_ratio=LSTM_DENSE / (LSTM_DENSE - MATRIX + lp.params),
        format=ev["format"],
        ranks=lp.ranks if hasattr(lp, "ranks") else None,
        macs=plan.compressed_macs,
        dense_macs=plan.model_macs,
        macs_reduction=ev["macs_reduction"],
    )
    return res


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of top-1 per method over the seeds (official split) and
    over the six held-out speakers."""
    out: dict[str, Any] = {}
    for proto, keys, n in (
        ("official", OFFICIAL_KEYS + FIRST_TRY_KEYS, len(SEEDS)),
        ("speaker", SPEAKER_KEYS, len(SPEAKERS)),
    ):
        rows = {}
        for k in keys:
            of = 1 if k in FIRST_TRY_KEYS else n
            got = [r for r in results if r["key"] == k and r["fold"].startswith(proto)]
            if not got:
                continue
            if proto == "speaker":  # the mean over a fold's seeds, then over the 6 folds
                per_fold: dict[str, list[float]] = {}
                for r in got:
                    per_fold.setdefault(r["fold"], []).append(r["top1"])
                values = {f: statistics.fmean(v) for f, v in per_fold.items()}
                m, s = _mean_std(list(values.values()))
                rows[k] = {
                    "mean": m,
                    "std": s,
                    "n": len(values),
                    "of": of,
                    "seeds_per_fold": {f: len(v) for f, v in per_fold.items()},
                    "values": values,
                    "runs": {f"{r['fold']}/s{r['seed']}": r["top1"] for r in got},
                }
                continue
            m, s = _mean_std([r["top1"] for r in got])
            rows[k] = {
                "mean": m,
                "std": s,
                "n": len(got),
                "of": of,
                "values": {f"s{r['seed']}": r["top1"] for r in got},
            }
        out[proto] = rows
    out["paired"] = paired(out)
    return out


def paired(summ: dict[str, Any], admm: str = "tt_117x") -> dict[str, Any]:
    """ADMM minus each other method, paired by seed (official), by held-out speaker and
    seed (``speaker``) and by held-out speaker, on the mean over its seeds (``speaker, fold
    means``): mean and standard deviation of the differences (points) and ADMM's wins /
    ties / losses."""
    out: dict[str, Any] = {}
    for proto, field in (
        ("official", "values"),
        ("speaker", "runs"),
        ("speaker, fold means", "values"),
    ):
        rows = summ[proto.split(",")[0]]
        a = rows.get(admm, {}).get(field, {})
        for k, row in rows.items():
            if k == admm or k in FIRST_TRY_KEYS:
                continue
            common = sorted(set(a) & set(row[field]))
            if not common:
                continue
            d = [a[c] - row[field][c] for c in common]
            m, sd = _mean_std(d)
            out[f"{proto}: {admm} - {k}"] = {
                "mean": m,
                "std": sd,
                "n": len(d),
                "wins": sum(x > 0 for x in d),
                "ties": sum(x == 0 for x in d),
                "losses": sum(x < 0 for x in d),
            }
    return out


def latency(data_root: str, repeats: int = 15) -> list[dict[str, Any]]:
    """Per-sequence inference latency of the seed-0 official models (dense and every
    compressed one that finished), batch 1 and 32, 16 steps, PyTorch eager, 1 thread:
    medians of interleaved repeats (each model timed once per round, in turn)."""
    torch.set_num_threads(1)  # (the models, dense and compressed, timed in turn)
    models = {
        r["key"]: run_model(
            CONFIGS / f"{r['key']}.yaml", REPO / r["out_dir"], data_root, r["key"] == "dense"
        )
        for r in runs()
        if r["fold"] == "official" and r["seed"] == 0 and finished(r)
    }
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for batch in (1, 32):
        x = torch.randn(batch, 16, 1025, generator=gen)
        x[..., -1] = 1.0  # every step valid: the full 16-step sequence
        inputs[batch] = x
    rows = interleaved_latency(models, inputs, repeats)
    for r in rows:
        r["us_per_sequence"] = r.pop("us_per_sample")
    return rows


def _pm(row: dict[str, Any] | None) -> str:
    if not row:
        return "not run"
    s = f"{row['mean']:.2f} ± {row['std']:.2f}"
    return s + ("" if row["n"] == row["of"] else f" ({row['n']} of {row['of']})")


def write_page(doc: dict[str, Any]) -> None:
    res, summ = doc["runs"], doc["summary"]
    first = {
        k: next(
            (r for r in res if r["key"] == k and r["fold"] == "official" and r["seed"] == 0), None
        )
        for k in METHODS
    }
    lines = [
        "# TT-LSTM on real speech: the Free Spoken Digit Dataset (issue 20)",
        "",
        *command_block(COMMAND),
        "DATA holds `free-spoken-digit-dataset/` (see the README, section Data). Every run's own",
        "command is in `benchmarks/results/quality-fsdd.json` (`command`).",
        "",
        "Model: one-layer LSTM, 128 hidden units, on 16 steps of 1,024 inputs (8 log-spectrogram",
        "frames of 128 bins, 64 ms of speech per step), the last valid hidden state into a",
        "linear layer. Compressed: the input-to-hidden matrix (1,024 x 512, 524,288 parameters;",
        "89% of the LSTM). Dense: 30 epochs (Adam, lr 2e-3, cosine). Compressed runs start from",
        "the dense run of the same seed and fold: ADMM 20 + fine-tune 20 epochs; TT-SVD +",
        "fine-tune: 40 fine-tuning epochs; from scratch: 70 epochs (30 + 40) from random init.",
        "",
        "## Official split (300 test recordings), 3 seeds",
        "",
        "| method | matrix params | matrix ratio | LSTM ratio | whole-model ratio | MACs "
        "per sequence | top-1 % (mean ± std) | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, (label, _) in METHODS.items():
        r, s = first[k], summ["official"].get(k)
        if r is None:
            lines.append(f"| {label} | | | | | | not run | |")
            continue
        if k == "dense":
            ratio = "1x | 1x | 1x"
            dense_macs = next((x["dense_macs"] for x in res if x.get("dense_macs")), None)
            macs = "" if dense_macs is None else f"{dense_macs:,}"
        else:
            ratio = f"{r['matrix_ratio']:.0f}x | {r['lstm_ratio']:.1f}x | {r['ratio']:.2f}x"
            red = r["macs_reduction"]
            macs = (
                f"{r['macs']:,} ({red:.2f}x fewer)"
                if red >= 1
                else (f"{r['macs']:,} ({1 / red:.1f}x more)")
            )
        per = ", ".join(f"{v:.2f}" for v in s["values"].values()) if s else ""
        lines.append(f"| {label} | {r['matrix_params']:,} | {ratio} | {macs} | {_pm(s)} | {per} |")
    lines += [
        "",
        "## Leave-one-speaker-out (500 test recordings of the held-out speaker)",
        "",
        "Per speaker: the mean over the fold's seeds (seed 0, and seeds 1 and 2 where run; the",
        "compressed runs of seeds 1-2 trained their TT layers through the rebuilt kernel,",
        "`runtime.execution: rebuilt`, the same function); mean ± std over the 6 speakers.",
        "",
        "| method | mean ± std over 6 speakers | seeds per speaker | "
        + " | ".join(SPEAKERS)
        + " |",
        "|---|---|---|" + "---|" * len(SPEAKERS),
    ]
    for k in SPEAKER_KEYS:
        s = summ["speaker"].get(k)
        vals = [
            f"{s['values'][f'speaker-{sp}']:.2f}" if s and f"speaker-{sp}" in s["values"] else ""
            for sp in SPEAKERS
        ]
        seeds = sorted(set(s["seeds_per_fold"].values())) if s and "seeds_per_fold" in s else [1]
        per = "-".join(str(v) for v in (seeds[0], seeds[-1])) if len(seeds) > 1 else str(seeds[0])
        lines.append(f"| {METHODS[k][0]} | {_pm(s)} | {per} | " + " | ".join(vals) + " |")
    if summ.get("paired"):
        lines += [
            "",
            "## ADMM -> TT 117x against each method, paired (official: same seed; speaker: same"
            " held-out speaker and seed; fold means: same speaker, mean over its seeds)",
            "",
            "| comparison | mean difference (points) ± std | pairs | ADMM wins / ties / losses |",
            "|---|---|---|---|",
        ]
        for name, d in summ["paired"].items():
            lines.append(
                f"| {name} | {d['mean']:+.2f} ± {d['std']:.2f} | {d['n']} "
                f"| {d['wins']} / {d['ties']} / {d['losses']} |"
            )
    if doc.get("latency"):
        lines += [
            "",
            "## Inference latency per sequence (16 steps; seed-0 models; PyTorch eager, 1 thread)",
            "",
            "Each layer run factorized (2026-12-06, before the per-layer execution choice and",
            "`fold_kernels`); as deployed, after them, in eager, compiled and ONNX Runtime at",
            "1 and 2 threads: `benchmarks/results/inference.json`, group `lstm_fsdd`",
            "(docs/performance.md).",
            "",
            "| model | batch 1: µs / sequence | vs dense | batch 32: µs / sequence | vs dense |",
            "|---|---|---|---|---|",
        ]
        lat = {(x["key"], x["batch"]): x for x in doc["latency"]}
        for k in METHODS:
            if (k, 1) not in lat:
                continue
            a, b = lat[(k, 1)], lat[(k, 32)]
            lines.append(
                f"| {METHODS[k][0]} | {a['us_per_sequence']:.0f} | {a['speedup_vs_dense']:.2f}x "
                f"| {b['us_per_sequence']:.0f} | {b['speedup_vs_dense']:.2f}x |"
            )
    if doc.get("controls"):
        lines += [
            "",
            "## Control runs: does the execution mode change the result?",
            "",
            "The compressed runs of seeds 1-2 trained their TT layers through the rebuilt kernel",
            "(`runtime.execution: rebuilt`), seed 0 factorized. The same run in the other mode:",
            "",
            "| run | recorded (mode) | control (mode) | command of the control |",
            "|---|---|---|---|",
        ]
        for c in doc["controls"]:
            lines.append(
                f"| {c['id']} | {c['recorded']:.1f} ({c['recorded_mode']}) | "
                f"{c['top1']:.1f} ({c['mode']}) | `{c['command']}` |"
            )
    lines += ["", "## Verdict", "", doc.get("verdict") or "(runs not finished)", ""]
    lines += ["![curves and accuracy vs compression](fsdd.png)", ""]
    atomic_write_text(PAGE, "\n".join(lines))


def plot(doc: dict[str, Any]) -> None:
    plt = pyplot()
    if plt is None:
        return
    res, summ = doc["runs"], doc["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in res:
        if r["fold"] != "official" or r["seed"] != 0:
            continue
        acc = [100 * c["test_acc"] for c in r["curve"] if c["phase"] != "dense"]
        if r["key"] == "dense":
            acc = [100 * c["test_acc"] for c in r["curve"]]
        a.plot(range(1, len(acc) + 1), acc, label=METHODS[r["key"]][0])
    a.set(
        xlabel="epoch of the run's own phases (dense: its 30; compressed: after dense)",
        ylabel="test top-1 % (official split, seed 0)",
        ylim=(80, 100),
    )
    a.legend(fontsize=7)
    for k, marker in (
        ("tt_12x", "o"),
        ("tt_93x", "o"),
        ("tt_117x", "o"),
        ("tt_819x", "o"),
        ("tt_117x_dtf", "s"),
        ("tt_117x_scratch", "^"),
        ("tr_114x", "D"),
        ("svd_114x", "v"),
    ):
        s = summ["official"].get(k)
        r = next((x for x in res if x["key"] == k), None)
        if s and r:
            b.errorbar(
                r["matrix_ratio"],
                s["mean"],
                yerr=s["std"],
                fmt=marker,
                capsize=3,
                label=METHODS[k][0],
            )
    d = summ["official"].get("dense")
    if d:
        b.axhline(d["mean"], color="k", ls="--", lw=1, label="dense (mean of seeds)")
    b.set(
        xscale="log",
        xlabel="input-to-hidden matrix compression (x)",
        ylabel="test top-1 % (mean ± std, 3 seeds)",
    )
    b.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, FIGURE)


def collect(lat: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    recorded = {r["id"]: r for r in old.get("runs", [])}
    results = []
    for r in runs():  # a run folder's result, else the recorded one
        got = collect_run(r) or recorded.get(r["id"])
        if got is not None:
            results.append(got)
    doc = {
        "dataset": "fsdd",
        "command": COMMAND,
        "torch": torch.__version__,
        "runs": results,
        "summary": summarise(results),
        "latency": lat if lat is not None else old.get("latency"),
        "controls": old.get("controls"),
        "verdict": old.get("verdict"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(doc, indent=1) + "\n")
    write_page(doc)
    plot(doc)
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run what is not finished, then collect")
    ap.add_argument("--latency", action="store_true", help="time the seed-0 models")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data-root", default=None)
    a = ap.parse_args(argv)
    if (a.run or a.latency) and not a.data_root:
        ap.error("--run and --latency need --data-root")
    if a.run:
        run_all(a.data_root, a.jobs)
    lat = latency(a.data_root) if a.latency else None
    doc = collect(lat)
    n = len(doc["runs"])
    print(
        f"collected {n} of {len(runs())} runs -> {RESULTS.relative_to(REPO)}, "
        f"{PAGE.relative_to(REPO)}"
    )


if __name__ == "__main__":
    main()
