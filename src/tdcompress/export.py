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

import dataclasses
import importlib.util
import inspect
import keyword
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    input_names: tuple[str, ...] = ()  # the graph's inputs, in order (several-input models)
    output_names: tuple[str, ...] = ()  # the flattened output leaves, in the graph's order
    dynamic_dims: tuple[tuple[int, str], ...] = ()  # (dimension, name) left free in every input
    checked_shapes: tuple[tuple[tuple[int, ...], ...], ...] = ()  # input shapes run, per check

    def summary(self) -> str:
        check = (
            "not checked"
            if self.checked_with is None
            else f"max |exported - eager| = {self.max_abs_diff:.3g} ({self.checked_with})"
        )
        free = dict(self.dynamic_dims)
        shape = tuple(free.get(d, n) for d, n in enumerate(self.input_shape))
        sizes = ", ".join(str(n) for n in self.checked_batch_sizes)
        if self.checked_with is not None and self.dynamic_dims:
            if set(free) == {0}:
                check += f" at batch sizes {sizes}"
            else:
                runs = "; ".join(
                    ", ".join("x".join(map(str, s)) for s in run) for run in self.checked_shapes
                )
                check += f" at input shapes {runs}"
        if len(self.input_names) > 1:
            check += f"; inputs {', '.join(self.input_names)}"
        if len(self.output_names) > 1:
            check += f"; outputs {', '.join(self.output_names)}"
        return (
            f"{self.path} ({self.format}, {self.file_bytes / 1024:.1f} KiB, "
            f"{self.params:,} parameters, input ({', '.join(map(str, shape))})): {check}"
        )


def export_model(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[Any],
    path: str | os.PathLike[str],
    format: str | None = None,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    dynamic_batch: bool = False,
    debug_metadata: bool = False,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_dims: Mapping[int, str] | None = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) traced on ``example_input`` to ``path``.

    ``format``: "onnx" or "pt2"; by default taken from the suffix of ``path``. With
    ``check`` the written file is run on ``example_input`` and must agree with the eager
    model within ``atol + rtol * max|eager|``; otherwise a ``RuntimeError`` is raised and
    ``path`` is left as it was. The file is written atomically (temporary file, then rename).
    ONNX weights go into the one file unless they exceed protobuf's limit (then beside it, in
    ``<name>.data``, listed in ``files``).

    Several inputs: ``example_input`` may be a tuple of positional inputs and
    ``example_kwargs`` a dict of keyword inputs (``{"attention_mask": mask}``); their tensors
    become the graph's inputs, in that order, named after the model's arguments
    (``input_names``); other values (``None``, flags) are fixed into the graph. Outputs may
    be a tensor or nested tuples, lists, dicts and dataclasses of tensors (a Hugging Face
    ``ModelOutput``): a single tensor output is exported as it is; otherwise the graph
    returns the tensor leaves, flattened in order (``output_names``: their paths, e.g.
    ``last_hidden_state``), and the check compares them leaf by leaf.

    ``dynamic_batch``: the graph's first input dimension is free (``N``) instead of the
    example's batch size (dimension 0 of the input: a time-major LSTM model's is its
    sequence length); the check then runs the example and a second batch size (1, or 3
    when the example has one sample; samples made of the example's values). The factorized
    layers' contraction order is the one planned for the example's batch size (at least 2).
    ``dynamic_dims`` frees more dimensions of every tensor input, ``{dimension: name}``
    (``{0: "batch", 1: "seq"}`` for token inputs ``(N, S)``; every input having that
    dimension must have the same size there); the check runs a second size of each (one
    less, or one more for sizes up to 2; made of the example's values). Dimensions traced
    at size 1 are traced at 2. ``torch.export`` infers the range of a free dimension other
    than the batch from the model (a position table caps the sequence length).

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
    if isinstance(example_input, torch.Tensor):
        args: tuple = (example_input,)
    elif isinstance(example_input, tuple):
        args = example_input
    else:
        raise TypeError(
            "example_input must be a torch.Tensor or a tuple of positional inputs, got "
            f"{type(example_input).__name__}"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(
            f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}"
        )
    kwargs = dict(example_kwargs or {})
    names, tensors = _input_names(model, args, kwargs)
    if not tensors:
        raise ValueError("export_model needs at least one tensor among the example inputs")
    dims = _dynamic_dims(dynamic_batch, dynamic_dims)
    for d in dims:
        if not any(t.dim() > d and t.shape[d] >= 1 for t in tensors):
            if dims == {0: "N"}:
                raise ValueError(
                    f"dynamic_batch needs an example_input with a batch dimension of size >= "
                    f"1, got shape {tuple(tensors[0].shape)}"
                )
            raise ValueError(
                f"dynamic_dims names dimension {d} ({dims[d]!r}), which no example input has "
                f"with a size >= 1; input shapes: {[tuple(t.shape) for t in tensors]}"
            )
        sizes = {n: int(t.shape[d]) for n, t in zip(names, tensors) if t.dim() > d}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"dynamic dimension {d} ({dims[d]!r}) has different sizes in the inputs "
                f"{sizes}; a free dimension is shared by every input that has it"
            )
    if format == "onnx":
        _require("onnx", "ONNX export")
        _require("onnxscript", "ONNX export (torch.onnx.export uses it)")
    params = next(iter(model.parameters()), None)
    for n, t in zip(names, tensors):
        if params is not None and params.device != t.device:
            raise ValueError(
                f"example input {n!r} is on {t.device} but the model is on "
                f"{params.device}; move one of them"
            )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    # kernels folded for PyTorch inference (fold_kernels) stay out of the file: the graph
    # rebuilds them from the cores (restored after)
    from tdcompress.layers._base import FOLDED

    folded = [(m, m._buffers.pop(FOLDED)) for m in model.modules() if FOLDED in m._buffers]
    path.parent.mkdir(parents=True, exist_ok=True)
    # written under its final name in a private folder beside ``path``: ONNX may add a
    # ``<name>.data`` file that the graph names, so both move out together once checked
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmpdir / path.name
    try:
        runs = [tensors]
        trace, dynamic_shapes = tensors, None
        if dims:
            first = [tensors]
            trace = _resized(tensors, dims, lambda d, n: max(n, 2))
            other_sizes = {
                d: (1 if n > 1 else 3) if d == 0 else (n - 1 if n > 2 else n + 1)
                for d in dims
                for n in [next(int(t.shape[d]) for t in tensors if t.dim() > d)]
            }
            runs = [*first, _resized(tensors, dims, lambda d, n: other_sizes[d])]
            dynamic_shapes = tuple(
                {
                    d: torch.export.Dim("batch", min=1) if d == 0 else torch.export.Dim.DYNAMIC
                    for d in dims
                    if t.dim() > d
                }
                or None
                for t in tensors
            )
        graph = _Graph(model, args, kwargs, names)
        wants, out_names = [], None
        with torch.no_grad():
            for run in runs if check else runs[:1]:
                leaves = _leaves(graph.call(*run))
                wants.append([t for _, t in leaves])
                out_names = tuple(n for n, _ in leaves)
        assert out_names is not None
        single = len(tensors) == 1 and not kwargs and len(args) == 1 and out_names == ("output",)
        # one tensor in, one out: the model itself (the graph as before several-input support)
        target = model if single else graph
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            if format == "pt2":
                program = torch.export.export(target, tuple(trace), dynamic_shapes=dynamic_shapes)
                torch.export.save(program, tmp)
            else:
                # one self-contained file unless the weights exceed protobuf's 2 GB limit
                big = sum(  # (the factorized layers' records in the state dict are dicts)
                    t.numel() * t.element_size()
                    for t in model.state_dict().values()
                    if isinstance(t, torch.Tensor)
                )
                extra: dict[str, Any] = {}
                if dynamic_shapes is not None:
                    extra["dynamic_shapes"] = dynamic_shapes
                if not single:
                    extra["input_names"] = list(names)
                    extra["output_names"] = [_onnx_name(n) for n in out_names]
                program = torch.onnx.export(
                    target, tuple(trace), None, verbose=False, optimize=False, **extra
                )
                _optimize_onnx(program)
                program.save(tmp, external_data=big > 1.5e9)
                if not debug_metadata:
                    _strip_node_metadata(tmp)
        diff, how = None, None
        if check:
            gots, how = _run_exported(tmp, format, runs, names)
            diff = 0.0
            for got, want in zip(gots, wants):
                if len(got) != len(want):
                    raise RuntimeError(
                        f"the exported {format} graph gives {len(got)} outputs, the model "
                        f"{len(want)} ({', '.join(out_names)}); nothing written to {str(path)!r}"
                    )
                for name, g, w in zip(out_names, got, want):
                    what = "" if single else f" (output {name})"
                    diff = max(diff, _compare(g, w, format, how, path, atol, rtol, what))
        written = sorted(tmpdir.iterdir(), key=lambda f: f == tmp)  # the graph itself last
        for f in written:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        for m, training in modes:  # each module's own mode back
            m.training = training
        for m, kernel in folded:
            m._buffers[FOLDED] = kernel
    files = tuple(path.parent / f.name for f in written)
    done = runs if check else []
    return ExportResult(
        path=path,
        format=format,
        input_shape=tuple(tensors[0].shape),
        file_bytes=sum(f.stat().st_size for f in files),
        params=sum(p.numel() for p in model.parameters()),
        max_abs_diff=diff,
        checked_with=how,
        files=files,
        dynamic_batch=0 in dims,
        checked_batch_sizes=tuple(int(r[0].shape[0]) for r in done if r[0].dim()),
        input_names=tuple(names),
        output_names=out_names,
        dynamic_dims=tuple(sorted(dims.items())),
        checked_shapes=tuple(tuple(tuple(t.shape) for t in r) for r in done),
    )


def _dynamic_dims(dynamic_batch: bool, dynamic_dims: Mapping[int, str] | None) -> dict[int, str]:
    dims = {0: "N"} if dynamic_batch else {}
    if dynamic_dims is None:
        return dims
    if not isinstance(dynamic_dims, Mapping):
        raise TypeError(
            "dynamic_dims must be a dict {dimension: name}, e.g. {0: 'batch', 1: 'seq'}, got "
            f"{type(dynamic_dims).__name__}"
        )
    for d, n in dynamic_dims.items():
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or not isinstance(n, str):
            raise ValueError(
                f"dynamic_dims maps a dimension (an int >= 0) to a name (a str), got {d!r}: {n!r}"
            )
    return {**dims, **dict(dynamic_dims)}


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], list]:
    """Names (the model's argument names where they are known) and values of the tensor
    inputs, positional first."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args)
        pos_names = list(bound.arguments)
    except (TypeError, ValueError):
        pos_names = []
    names, tensors = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            n = pos_names[i] if i < len(pos_names) else f"input_{i}"
            if not n.isidentifier() or keyword.iskeyword(n) or n in kwargs:
                n = f"input_{i}"
            names.append(n)
            tensors.append(a)
    for k, v in kwargs.items():
        if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
            raise ValueError(f"example_kwargs has the key {k!r}, which is not an argument name")
        if isinstance(v, torch.Tensor):
            names.append(k)
            tensors.append(v)
    return names, tensors


class _Graph(nn.Module):
    """The model called with its tensor inputs positionally (the other example inputs fixed)
    and its output flattened to a tuple of tensor leaves (a single tensor kept as it is)."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self._args = [None if isinstance(a, torch.Tensor) else a for a in args]
        self._slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self._kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        self._kw_tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self._n_pos = len(self._slots)
        # a forward whose parameters carry the input names (ONNX and torch.export use them)
        ns: dict[str, Any] = {}
        params = ", ".join(names)
        exec(f"def forward(self, {params}):\n    return self._flat({params})", ns)  # noqa: S102
        self.forward = ns["forward"].__get__(self)  # type: ignore[method-assign]

    def call(self, *tensors: torch.Tensor) -> Any:
        args = list(self._args)
        for i, t in zip(self._slots, tensors):
            args[i] = t
        kwargs = dict(self._kwargs)
        kwargs.update(zip(self._kw_tensors, tensors[self._n_pos :]))
        return self.model(*args, **kwargs)

    def _flat(self, *tensors: torch.Tensor) -> Any:
        leaves = _leaves(self.call(*tensors))
        if len(leaves) == 1 and leaves[0][0] == "output":
            return leaves[0][1]
        return tuple(t for _, t in leaves)


def _leaves(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensor leaves of a (nested) output with their paths, in order; None skipped."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if out is None:
        return []
    join = (lambda k: f"{prefix}.{k}") if prefix else str
    if isinstance(out, Mapping):
        items = list(out.items())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        raise TypeError(
            f"export_model compares tensor outputs (nested in tuples, lists, dicts or "
            f"dataclasses), but output {prefix or 'output'!r} is a {type(out).__name__}"
        )
    return [leaf for k, v in items for leaf in _leaves(v, join(k))]


def _onnx_name(path: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in path)


def _resized(tensors: list, dims: dict[int, str], size: Any) -> list:
    """``tensors`` with each free dimension ``d`` at ``size(d, n)`` (n: its size now):
    shortened, or grown with the example's values in other orders (the example, its last
    dimension reversed, then rolled), so that entries mixed up by the graph would show."""
    out = []
    for t in tensors:
        x = t
        for d in sorted(dims):
            if x.dim() <= d:
                continue
            n, want = int(x.shape[d]), size(d, int(t.shape[d]))
            if want > n:
                parts = [x, x.flip(-1), x.roll(1, -1)]
                while sum(int(p.shape[d]) for p in parts) < want:
                    parts += parts
                x = torch.cat(parts, d)
            x = x.narrow(d, 0, want)
        out.append(_same_layout(x, t))
    return out


def _compare(
    got: torch.Tensor,
    want: torch.Tensor,
    format: str,
    how: str,
    path: Path,
    atol: float,
    rtol: float,
    what: str = "",
) -> float:
    """max |got - want|; raises if the shapes differ or it exceeds atol + rtol * max|want|."""
    got = got.to(want.device, want.dtype)
    if got.shape != want.shape:
        raise RuntimeError(
            f"the exported {format} graph gives an output{what} of shape {tuple(got.shape)}, "
            f"the model {tuple(want.shape)}; nothing written to {str(path)!r}"
        )
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    bound = atol + rtol * float(want.abs().max()) if want.numel() else atol
    if not diff <= bound:  # also catches NaN
        raise RuntimeError(
            f"the exported {format} graph differs from the model{what} by up to {diff:.3g} "
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
    path: Path, format: str, runs: list[list[torch.Tensor]], names: Sequence[str]
) -> tuple[list[list[torch.Tensor]], str]:
    """The exported file's output leaves on each run of inputs, and what ran them."""
    if format == "pt2":
        run = torch.export.load(path).module()
        with torch.no_grad():
            return [[t for _, t in _leaves(run(*xs))] for xs in runs], "torch.export.load"
    feeds = [{n: x.detach().cpu().numpy() for n, x in zip(names, xs)} for xs in runs]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph_inputs = [i.name for i in sess.get_inputs()]
        run_one = lambda f: sess.run(None, f)  # noqa: E731
        how = "onnxruntime"
    else:
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        ref = ReferenceEvaluator(proto)
        graph_inputs = [i.name for i in proto.graph.input]
        run_one = lambda f: ref.run(None, f)  # noqa: E731
        how = "onnx.reference"
    if len(names) == 1:  # one input: whatever the exporter named it
        feeds = [{graph_inputs[0]: next(iter(f.values()))} for f in feeds]
    else:  # inputs the graph does not use may have been dropped by the exporter
        feeds = [{n: v for n, v in f.items() if n in graph_inputs} for f in feeds]
    return [[torch.from_numpy(a) for a in run_one(f)] for f in feeds], how
