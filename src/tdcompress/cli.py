"""The ``tdcompress`` command: the pipeline, its single stages, the demo, and export."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tdcompress.pipeline import STAGES

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdcompress",
        description="Compress neural networks with ADMM-regularized tensor decompositions.",
    )
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
    ex.add_argument("--format", choices=["onnx", "pt2"], default="onnx", help="default: onnx")
    ex.add_argument(
        "--weights",
        choices=["finetuned", "decomposed", "dense"],
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
    ex.add_argument("--output", help="file to write (default: <out_dir>/model.<format>)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; under torchrun a successful command ends by destroying the
    process group on every rank (an error leaves it to torchrun to stop the others)."""
    from tdcompress.train.distributed import cleanup

    rc = _main(argv)
    if rc == 0:
        cleanup()
    return rc


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tdcompress.config import load_config
    from tdcompress.pipeline import Pipeline
    from tdcompress.train.distributed import is_main

    try:
        cfg = load_config(DEMO_CONFIG if args.command == "demo" else args.config, list(args.set))
    except (ValueError, FileNotFoundError) as e:
        print(f"tdcompress: error: {e}", file=sys.stderr)
        return 2
    # paths verbatim (as --set values they would be read as YAML: "runs/a #2" -> "runs/a")
    if args.data_root:
        cfg.data.root = args.data_root
    if args.out_dir:
        cfg.runtime.out_dir = args.out_dir
    pipe = Pipeline(cfg)
    if args.command == "export":
        try:
            res = pipe.export(
                args.output,
                args.format,
                args.weights,
                args.batch_size,
                args.dynamic_batch,
                args.debug_metadata,
            )
        except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as e:
            print(f"tdcompress: error: {e}", file=sys.stderr)
            return 2
        print(res.summary())
        return 0
    if getattr(args, "reuse_from", None):
        try:
            taken = pipe.reuse_stages(args.reuse_from)
        except (ValueError, FileNotFoundError) as e:
            print(f"tdcompress: error: {e}", file=sys.stderr)
            return 2
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
