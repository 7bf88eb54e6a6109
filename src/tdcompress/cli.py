"""The ``tdcompress`` command: the pipeline, its single stages, the demo, export, bench and
download.

An error the user can cause (a missing or corrupt file, a malformed config, a bad setting)
prints one line, ``tdcompress: error: ...``, and exits with status 2; ``--debug`` shows
the traceback instead."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tdcompress.bench import RUNTIMES, WEIGHTS
from tdcompress.export import EXPORT_FORMATS
from tdcompress.pipeline import EXPORT_WEIGHTS, STAGES

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdcompress",
        description="Compress neural networks with ADMM-regularized tensor decompositions.",
    )
    debug_help = "on an error, show the Python traceback instead of one line"
    p.add_argument("--debug", action="store_true", help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)

    def common(
        sp: argparse.ArgumentParser, config_required: bool = True, force: bool = True
    ) -> None:
        if config_required:
            sp.add_argument("config", help="experiment YAML (see configs/)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set admm.epochs=5 (repeatable)",
        )
        sp.add_argument("--data-root", help="folder holding the datasets (data.root)")
        sp.add_argument("--out-dir", help="run folder for checkpoints and reports")
        if force:
            sp.add_argument("--force", action="store_true", help="rerun finished stages")
        # (also after the command; SUPPRESS keeps a --debug given before it)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)

    pl = sub.add_parser("pipeline", help="run every stage, resuming finished ones")
    common(pl)
    pl.add_argument(
        "--reuse-from",
        metavar="RUN_DIR",
        help="first take the finished stages of another run folder whose settings match "
        "(e.g. its ADMM phase, to fine-tune it differently); rerunnable",
    )
    for s in STAGES:
        common(sub.add_parser(s, help=f"run the {s} stage only"))
    common(
        sub.add_parser("demo", help="the whole pipeline on the bundled digits (CPU, <3 min)"),
        config_required=False,
    )
    ex = sub.add_parser(
        "export",
        help="write the run's model as ONNX or a torch.export program (.pt2), checked "
        "against the eager model",
    )
    common(ex, force=False)
    ex.add_argument("--format", choices=list(EXPORT_FORMATS), default="onnx", help="default: onnx")
    ex.add_argument(
        "--weights",
        choices=list(EXPORT_WEIGHTS),
        default="finetuned",
        help="which of the run's models (default: finetuned)",
    )
    ex.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="samples per input; the graph is specialised to it unless --dynamic-batch "
        "(default: 1)",
    )
    ex.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="let the graph take any batch size (the factorized layers keep the contraction "
        "order planned for --batch-size, or 2 if it is 1)",
    )
    ex.add_argument(
        "--debug-metadata",
        action="store_true",
        help="keep the ONNX exporter's per-node provenance (module path, FX node): a larger file",
    )
    ex.add_argument(
        "--execution-choice",
        action="store_true",
        help="let each factorized layer measure here whether it runs faster factorized or "
        "through its kernel rebuilt from the cores (folded by the runtime at load; the file "
        "keeps the compressed size), and export that",
    )
    ex.add_argument("--output", help="file to write (default: <out_dir>/model.<format>)")
    bp = sub.add_parser(
        "bench",
        help="the run's dense and compressed models side by side: latency in eager, "
        "torch.compile and ONNX Runtime, file size, peak memory",
    )
    common(bp, force=False)
    bp.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], metavar="N")
    bp.add_argument("--threads", type=int, nargs="+", default=[1], metavar="N")
    bp.add_argument(
        "--runtimes",
        nargs="+",
        default=list(RUNTIMES),
        choices=list(RUNTIMES),
        help="default: all three (onnxruntime needs pip install 'tdcompress[deploy]')",
    )
    bp.add_argument("--repeats", type=int, default=15, help="interleaved repeats (default: 15)")
    bp.add_argument(
        "--weights",
        choices=list(WEIGHTS),
        default="finetuned",
        help="the compressed model (default: finetuned)",
    )
    bp.add_argument(
        "--no-choice",
        action="store_true",
        help="run every factorized layer factorized (no per-layer execution choice)",
    )
    bp.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    bp.add_argument("--output", help="JSON to write (default: <out_dir>/bench.json)")
    from tdcompress.data.download import SOURCES

    dl = sub.add_parser(
        "download",
        help="download a dataset from its official mirrors (MD5-checked, written atomically)",
    )
    dl.add_argument("name", choices=sorted(SOURCES), help="the dataset")
    dl.add_argument(
        "--data-root",
        help="folder to download into (default: $TDCOMPRESS_DATA_ROOT); pass the same folder "
        "to the other commands as --data-root",
    )
    dl.add_argument("--force", action="store_true", help="download again even if present")
    dl.add_argument("--base-url", help="download from this URL instead of the official mirrors")
    dl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return p


#: errors a user can cause (files, settings, data, optional packages, a diverged run):
#: one line and status 2 (tracebacks with --debug); anything else is a bug and raises
USER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # FileNotFoundError, PermissionError, a failed download, ...
    ValueError,  # settings, corrupt files (ChecksumError, JSON, YAML through the loaders)
    ImportError,  # an optional extra that is not installed
    FloatingPointError,  # a diverged training phase (its message names the learning rate)
)


def _one_line(e: BaseException) -> str:
    """``e``'s message on one line (a multi-line message joined with "; ")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """The command line; under torchrun a successful command ends by destroying the
    process group on every rank (an error leaves it to torchrun to stop the others)."""
    from tdcompress.train.distributed import cleanup

    args = _parser().parse_args(argv)
    try:
        rc = _main(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"tdcompress: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if rc == 0:
        cleanup()
    return rc


def _download(args: argparse.Namespace) -> int:
    from tdcompress.data.download import download
    from tdcompress.data.readers import default_root

    root = args.data_root or default_root()
    if not root:
        raise ValueError(
            f"download needs a folder: pass --data-root DIR (or set $TDCOMPRESS_DATA_ROOT), "
            f"e.g. `tdcompress download {args.name} --data-root data`"
        )
    folder = download(args.name, root, base_url=args.base_url, force=args.force)
    print(f"{args.name}: {folder} (checksums verified); use --data-root {root}")
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.command == "download":
        return _download(args)
    from tdcompress.config import load_config
    from tdcompress.pipeline import Pipeline
    from tdcompress.train.distributed import is_main

    cfg = load_config(DEMO_CONFIG if args.command == "demo" else args.config, list(args.set))
    # paths verbatim (as --set values they would be read as YAML: "runs/a #2" -> "runs/a")
    if args.data_root:
        cfg.data.root = args.data_root
    if args.out_dir:
        cfg.runtime.out_dir = args.out_dir
    pipe = Pipeline(cfg)
    if args.command == "bench":
        from tdcompress.bench import bench_run, format_table

        doc = bench_run(
            pipe,
            weights=args.weights,
            out=args.output,
            batch_sizes=args.batch_sizes,
            threads=args.threads,
            runtimes=args.runtimes,
            repeats=args.repeats,
            choose=not args.no_choice,
            memory=not args.no_memory,
        )
        print(format_table(doc))
        print(f"\nwritten: {doc['meta']['written_to']}")
        return 0
    if args.command == "export":
        try:
            res = pipe.export(
                args.output,
                args.format,
                args.weights,
                args.batch_size,
                args.dynamic_batch,
                args.debug_metadata,
                args.execution_choice,
            )
        except (TypeError, RuntimeError) as e:  # (the exported file failing its check)
            if args.debug:
                raise
            print(f"tdcompress: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(res.summary())
        return 0
    if getattr(args, "reuse_from", None):
        taken = pipe.reuse_stages(args.reuse_from)
        what = ", ".join(taken) or (
            "nothing new (no finished stage with these settings there, or taken already)"
        )
        if is_main():
            print(f"reused from {args.reuse_from}: {what}", flush=True)
    stages = STAGES if args.command in ("pipeline", "demo") else (args.command,)
    pipe.run(stages, force=args.force)
    if "evaluate" in stages or "report" in stages:
        from tdcompress.report import result_table

        res = pipe.state()["done"].get("evaluate", {})
        if res and is_main():
            rows = result_table(res)
            w = max(len(a) for a, _ in rows)
            print("\n" + "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows))
            print(f"\nreport: {pipe.out / 'report.md'}")
            print(f"export: {_export_command(args)}")
    return 0


def _export_command(args: argparse.Namespace) -> str:
    """The ``tdcompress export`` command for the run just made (same config and options)."""
    words = ["tdcompress", "export", str(DEMO_CONFIG if args.command == "demo" else args.config)]
    for s in args.set:
        words += ["--set", s]
    if args.data_root:
        words += ["--data-root", args.data_root]
    if args.out_dir:
        words += ["--out-dir", args.out_dir]
    # ONNX needs the [onnx] extra: suggest it only where it is installed
    import importlib.util

    have_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))
    first, other = (
        ("onnx", "pt2") if have_onnx else ("pt2", "onnx, with pip install 'tdcompress[onnx]'")
    )
    return shlex.join([*words, "--format", first]) + f"  (or --format {other})"


if __name__ == "__main__":
    raise SystemExit(main())
