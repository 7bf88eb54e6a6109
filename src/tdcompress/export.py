"""Export a (compressed) model for deployment: ONNX or a ``torch.export`` program (``.pt2``).

The exported file is checked before it is kept: it is loaded back and run on the example
input (``.pt2`` with ``torch.export.load``; ONNX with onnxruntime when installed, else ONNX's
reference evaluator) and must match the eager model, else nothing is written.
:meth:`tdcompress.pipeline.Pipeline.export` (``tdcompress export CONFIG``) exports a run's
model this way. The graph is specialised to the example input's shape unless
``dynamic_batch=True``: then the batch dimension is left free (the checks run two batch
sizes), while the factorized layers keep the contraction order they chose for the example's
batch size (at least 2), which is the one to export at for the fastest graph.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_model"]

#: file format -> file suffix
EXPORT_FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how it was checked."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    file_bytes: int
    params: int
    max_abs_diff: float | None  # exported vs eager output on the example input
    checked_with: str | None  # "torch.export.load", "onnxruntime", "onnx.reference"
    files: tuple[Path, ...] = ()  # path, and ONNX's external weights file if it needed one
    dynamic_batch: bool = False  # the graph takes any batch size
    checked_batch_sizes: tuple[int, ...] = ()

    def summary(self) -> str:
        check = (
            "not checked"
            if self.checked_with is None
            else f"max |exported - eager| = {self.max_abs_diff:.3g} ({self.checked_with})"
        )
        shape = ("N", *self.input_shape[1:]) if self.dynamic_batch else self.input_shape
        sizes = ", ".join(str(n) for n in self.checked_batch_sizes)
        if self.checked_with is not None and self.dynamic_batch:
            check += f" at batch sizes {sizes}"
        return (
            f"{self.path} ({self.format}, {self.file_bytes / 1024:.1f} KiB, "
            f"{self.params:,} parameters, input ({', '.join(map(str, shape))})): {check}"
        )


def export_model(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    format: str | None = None,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    dynamic_batch: bool = False,
    debug_metadata: bool = False,
) -> ExportResult:
    """Export ``model`` (in eval mode) traced on ``example_input`` to ``path``.

    ``format``: "onnx" or "pt2"; by default taken from the suffix of ``path``. With
    ``check`` the written file is run on ``example_input`` and must agree with the eager
    model within ``atol + rtol * max|eager|``; otherwise a ``RuntimeError`` is raised and
    ``path`` is left as it was. The file is written atomically (temporary file, then rename).
    ONNX weights go into the one file unless they exceed protobuf's limit (then beside it, in
    ``<name>.data``, listed in ``files``).

    ``dynamic_batch``: the graph's first input dimension is free (``N``) instead of the
    example's batch size (dimension 0 of the input: a time-major LSTM model's is its
    sequence length); the check then runs the example and a second batch size (1, or 3
    when the example has one sample; samples made of the example's values). The factorized
    layers' contraction order is the one planned for the example's batch size (at least 2).

    ``debug_metadata``: keep the ONNX exporter's per-node provenance (module path, FX node,
    class hierarchy); by default it is removed, as it takes about as many bytes as the
    weights of a small compressed model (the trained CIFAR-10 ResNet-20 TT 6.8x at batch 1:
    300 KiB with it, 189 KiB without, 153 KiB of weights).
    """
    path = Path(path)
    if format is None:
        by_suffix = {s: f for f, s in EXPORT_FORMATS.items()}
        if path.suffix not in by_suffix:
            raise ValueError(
                f"path {str(path)!r}: cannot tell the format from the suffix "
                f"{path.suffix!r}; use one of {sorted(by_suffix)} or pass format= "
                f"(one of {sorted(EXPORT_FORMATS)})"
            )
        format = by_suffix[path.suffix]
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {sorted(EXPORT_FORMATS)}, got {format!r}")
    other = {s: f for f, s in EXPORT_FORMATS.items() if f != format}
    if path.suffix in other:
        raise ValueError(
            f"path {str(path)!r} has the suffix of format {other[path.suffix]!r} but format is "
            f"{format!r}; name the file *{EXPORT_FORMATS[format]} or pass "
            f"format={other[path.suffix]!r}"
        )
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if dynamic_batch and (example_input.dim() == 0 or example_input.shape[0] == 0):
        raise ValueError(
            f"dynamic_batch needs an example_input with a batch dimension of size >= 1, got "
            f"shape {tuple(example_input.shape)}"
        )
    if format == "onnx":
        _require("onnx", "ONNX export")
        _require("onnxscript", "ONNX export (torch.onnx.export uses it)")
    params = next(iter(model.parameters()), None)
    if params is not None and params.device != example_input.device:
        raise ValueError(
            f"example_input is on {example_input.device} but the model is on "
            f"{params.device}; move one of them"
        )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # written under its final name in a private folder beside ``path``: ONNX may add a
    # ``<name>.data`` file that the graph names, so both move out together once checked
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmpdir / path.name
    try:
        inputs = [example_input]
        trace_input, dynamic_shapes = example_input, None
        if dynamic_batch:
            x = example_input
            # other samples made of the example's values (valid for integer inputs too), so
            # that rows mixed up by the graph would show
            more = _same_layout(torch.cat([x, x.flip(-1), x.roll(1, -1)]), x)
            # torch.export specialises a dimension traced at size 1: trace at 2 then
            trace_input = x if x.shape[0] > 1 else more[:2]
            inputs.append(x[:1] if x.shape[0] > 1 else more[:3])
            dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
        wants = []
        with torch.no_grad():
            for x in inputs if check else inputs[:1]:
                want = model(x)
                if not isinstance(want, torch.Tensor):
                    raise TypeError(
                        f"export_model needs a model with one tensor output, got "
                        f"{type(want).__name__}"
                    )
                wants.append(want)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            if format == "pt2":
                program = torch.export.export(model, (trace_input,), dynamic_shapes=dynamic_shapes)
                torch.export.save(program, tmp)
            else:
                # one self-contained file unless the weights exceed protobuf's 2 GB limit
                big = sum(  # (the factorized layers' records in the state dict are dicts)
                    t.numel() * t.element_size()
                    for t in model.state_dict().values()
                    if isinstance(t, torch.Tensor)
                )
                extra = {} if dynamic_shapes is None else {"dynamic_shapes": dynamic_shapes}
                program = torch.onnx.export(
                    model, (trace_input,), None, verbose=False, optimize=False, **extra
                )
                _optimize_onnx(program)
                program.save(tmp, external_data=big > 1.5e9)
                if not debug_metadata:
                    _strip_node_metadata(tmp)
        diff, how = None, None
        if check:
            gots, how = _run_exported(tmp, format, inputs)
            diff = max(_compare(g, w, format, how, path, atol, rtol) for g, w in zip(gots, wants))
        written = sorted(tmpdir.iterdir(), key=lambda f: f == tmp)  # the graph itself last
        for f in written:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        for m, training in modes:  # each module's own mode back
            m.training = training
    files = tuple(path.parent / f.name for f in written)
    return ExportResult(
        path=path,
        format=format,
        input_shape=tuple(example_input.shape),
        file_bytes=sum(f.stat().st_size for f in files),
        params=sum(p.numel() for p in model.parameters()),
        max_abs_diff=diff,
        checked_with=how,
        files=files,
        dynamic_batch=dynamic_batch,
        checked_batch_sizes=tuple(int(x.shape[0]) for x in inputs) if check else (),
    )


def _compare(
    got: torch.Tensor,
    want: torch.Tensor,
    format: str,
    how: str,
    path: Path,
    atol: float,
    rtol: float,
) -> float:
    """max |got - want|; raises if the shapes differ or it exceeds atol + rtol * max|want|."""
    got = got.to(want.device, want.dtype)
    if got.shape != want.shape:
        raise RuntimeError(
            f"the exported {format} graph gives an output of shape {tuple(got.shape)}, "
            f"the model {tuple(want.shape)}; nothing written to {str(path)!r}"
        )
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    bound = atol + rtol * float(want.abs().max()) if want.numel() else atol
    if not diff <= bound:  # also catches NaN
        raise RuntimeError(
            f"the exported {format} graph differs from the model by up to {diff:.3g} "
            f"(allowed {bound:.3g}, checked with {how}); nothing written to {str(path)!r}"
        )
    return diff


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the {module!r} package: pip install 'tdcompress[onnx]'")


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (channels_last or contiguous): the factorized layers
    plan a channels_last input differently, and the traced graph keeps that plan."""
    from tdcompress.layers._base import is_channels_last

    cl = is_channels_last(like)
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


#: the largest constant (elements) the ONNX graph optimizer may fold into a bigger one than
#: the constants it replaces: shape arithmetic, not a kernel rebuilt from its cores
ONNX_FOLD_GROWTH_LIMIT = 256


def _optimize_onnx(program: object) -> None:
    """What ``torch.onnx.export(optimize=True)`` does (onnxscript's constant folding and
    fusions), except that no weight-only subgraph is folded into a constant larger than its
    inputs: a kernel rebuilt from factorized cores (a layer running its "rebuilt" execution
    mode, or a plan merging cores) stays a subgraph of the cores, so the file keeps the
    compressed size, and ONNX Runtime folds the subgraph once when it loads the file."""
    import onnxscript.optimizer

    model = program.model  # type: ignore[attr-defined]
    onnxscript.optimizer.optimize_ir(model, output_size_limit=ONNX_FOLD_GROWTH_LIMIT)
    try:
        from onnxscript.rewriter import onnx_fusions
    except ImportError:  # (older onnxscript: no fusions)
        return
    onnx_fusions.fuse(model)


def _strip_node_metadata(path: Path) -> None:
    """Remove the metadata of every node of the ONNX file ``path`` (in place; external
    weights, if any, are left untouched)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def strip(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g)
                for sub in attr.graphs:
                    strip(sub)

    strip(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            del node.metadata_props[:]
    onnx.save(proto, str(path))


def _run_exported(
    path: Path, format: str, xs: list[torch.Tensor]
) -> tuple[list[torch.Tensor], str]:
    """The exported file's outputs on each of ``xs`` and what ran them."""
    if format == "pt2":
        run = torch.export.load(path).module()
        with torch.no_grad():
            return [run(x) for x in xs], "torch.export.load"
    feeds = [x.detach().cpu().numpy() for x in xs]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return [torch.from_numpy(sess.run(None, {name: f})[0]) for f in feeds], "onnxruntime"
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ref, name = ReferenceEvaluator(proto), proto.graph.input[0].name
    return [torch.from_numpy(ref.run(None, {name: f})[0]) for f in feeds], "onnx.reference"
