"""Shared machinery of the factorized layers: the base module, plan caches and execution.

:class:`FactorizedLayer` (the base of every factorized Linear/Conv2d, with its record in the
state dict and the :class:`FactorizedWeight` proxy), the per-layer plan caches
(:func:`cache_plan`, :func:`warm_plans`, the batch entry of a cache key: :func:`batch_key`,
:data:`DYNAMIC`), the TT/TR forwards that run the cached plans, and the execution choice
(factorized or the kernel rebuilt from the cores, :func:`choose_execution`).

The contraction planner itself (cheapest contraction order by MACs, :class:`RingStructure`)
is :mod:`tdcompress.formats.contraction`; its names stay importable from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tdcompress.formats.base import FactorSpec, LayerGeometry, get_format
from tdcompress.formats.contraction import (  # noqa: F401  (re-exported: importable from here)
    EINSUM_COST,
    ConvPlan,
    Merge,
    Op,
    Program,
    RingStructure,
    Stage,
    plan_merge,
    plan_network,
    ring_ranks,
    run_merge,
    run_steps,
    structure_of,
)
from tdcompress.layers.registry import build

__all__ = [
    "plan_network",
    "run_steps",
    "RingStructure",
    "ConvPlan",
    "Stage",
    "plan_merge",
    "run_merge",
    "FactorizedLayer",
    "cache_plan",
    "warm_plans",
    "plan_batch",
    "batch_key",
    "planned_batch",
    "DYNAMIC",
    "size_hint",
    "is_channels_last",
    "EXTRA_STATE_VERSION",
    "no_init",
    "init_skipped",
    "check_record",
    "structural_spec",
    "load_with_record",
    "FactorizedWeight",
    "EXECUTION_MODES",
    "ExecutionRecord",
    "choose_execution",
    "clear_execution",
    "execution_key",
    "execution_modes",
    "rebuilt_forward",
    "rebuilt_layers",
    "run_chosen",
    "set_execution",
    "ANY_SHAPE",
    "set_model_execution",
    "chosen_mode",
    "folded_weight",
    "fold_kernels",
    "unfold_kernels",
    "folding",
]


def size_hint(n: int | torch.SymInt) -> int:
    """A concrete value of a size that may be symbolic (``torch.export`` with a dynamic
    batch), for choosing a plan only: adds no guard."""
    if not isinstance(n, torch.SymInt):
        return int(n)
    from torch.fx.experimental import symbolic_shapes as sym

    for name in ("optimization_hint", "hint_int", "size_hint"):
        fn = getattr(sym, name, None)
        if fn is not None:
            return int(fn(n))
    return int(n.node.hint)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-d tensor laid out channels_last (NHWC) and not also NCHW
    contiguous (as a tensor with one channel or one pixel is): the layouts the factorized
    layers plan differently."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def plan_batch(n: int | torch.SymInt) -> int:
    """The batch size to plan a forward for: ``n``, or for a symbolic ``n`` its hint but at
    least 2, so that the plan keeps the batch dimension and runs any batch size."""
    if isinstance(n, torch.SymInt):
        return max(2, size_hint(n))
    return int(n)


#: the batch entry of a plan-cache key under ``torch.compile`` for any batch of at least 2
#: samples: one plan, which runs every batch size, so a batch left symbolic
#: (``dynamic=True``) needs no guard on its value and one graph serves every batch size
DYNAMIC = -1
#: the batch a :data:`DYNAMIC` plan is made for when the layer has no plan of the same shape
#: for a known batch size (:func:`warm_plans` gives it the largest warmed one)
DYNAMIC_PLAN_BATCH = 32


def _dynamo_compiling() -> bool:
    # (torch < 2.3 has no torch.compiler.is_dynamo_compiling: the batch is read there, so a
    # dynamic compile specialises to it and recompiles per batch size, as it did before)
    fn = getattr(torch.compiler, "is_dynamo_compiling", None)
    return fn is not None and fn()


def batch_key(n: int | torch.SymInt) -> int:
    """The batch entry of a layer's plan-cache key for a batch (or row count) ``n``:
    :func:`plan_batch` of it in eager mode and under ``torch.export`` (which reads a
    symbolic size's hint without a guard). While ``torch.compile`` traces, a symbolic size
    looks like an int and reading it would specialise the graph to it, so every ``n >= 2``
    maps to :data:`DYNAMIC` (symbolic sizes are never 1 there: compile specialises 0 and 1)."""
    if _dynamo_compiling():
        return 1 if n == 1 else DYNAMIC
    return plan_batch(n)


def planned_batch(plans: dict, key: tuple) -> int:
    """The batch size to plan ``key`` of a layer's plan cache ``plans`` for: ``key[0]``; for
    a :data:`DYNAMIC` key the largest batch (>= 2) of a cached plan with the same other
    entries, else :data:`DYNAMIC_PLAN_BATCH`."""
    if key[0] != DYNAMIC:
        return key[0]
    known = [k[0] for k in plans if k[0] >= 2 and k[1:] == key[1:]]
    return max(known, default=DYNAMIC_PLAN_BATCH)


#: version of the record a factorized layer keeps in its state dict (``<name>._extra_state``)
EXTRA_STATE_VERSION = 1
#: the key of that record that says it is one (its value: the version)
RECORD_KEY = "tdcompress_layer"

_no_init = threading.local()


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Factorized layers (and :class:`~tdcompress.layers.FactorizedLSTM`) built inside this
    block skip ``reset_parameters``: their parameters stay uninitialised (``torch.empty``),
    for a caller that loads every one of them next (:func:`tdcompress.load_compressed`)."""
    _no_init.depth = getattr(_no_init, "depth", 0) + 1
    try:
        yield
    finally:
        _no_init.depth -= 1


def init_skipped() -> bool:
    """Whether layers built now skip their initialisation (inside :func:`no_init`)."""
    return getattr(_no_init, "depth", 0) > 0


def check_record(state: Any, where: str, keys: Sequence[str]) -> Mapping[str, Any]:
    """``state`` if it is a layer record of a version this code reads, holding ``keys``;
    else a ValueError that names ``where``."""
    if not isinstance(state, Mapping) or RECORD_KEY not in state:
        raise ValueError(
            f"{where}: the extra state {state!r} is not a tdcompress layer record "
            f"(a dict with {RECORD_KEY!r})"
        )
    version = state[RECORD_KEY]
    if not isinstance(version, int) or not 1 <= version <= EXTRA_STATE_VERSION:
        raise ValueError(
            f"{where}: layer record version {version!r}; this tdcompress reads versions 1 to "
            f"{EXTRA_STATE_VERSION} (a newer tdcompress wrote it: upgrade tdcompress)"
        )
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{where}: the layer record lacks the keys {missing}")
    return state


def load_with_record(
    module: nn.Module, load: Any, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any
) -> None:
    """``module``'s ``_load_from_state_dict`` (``load``, its base's) for a layer that keeps a
    record: a state dict of a tdcompress before the records (no ``<prefix>_extra_state``)
    loads with the layer's own record, and a record that does not describe the layer is
    refused naming the layer."""
    key = prefix + "_extra_state"
    if key not in state_dict:
        state_dict[key] = module.get_extra_state()  # (load_state_dict passes its own copy)
    try:
        load(state_dict, prefix, *args, **kw)
    except ValueError as e:
        raise ValueError(f"layer {prefix.rstrip('.') or '(the model itself)'!r}: {e}") from None


def structural_spec(spec: FactorSpec) -> FactorSpec:
    """``spec`` without its options (they steer decompositions, not the layer's shape)."""
    return dataclasses.replace(spec, options={})


#: tensor methods that only read a tensor's metadata: answered by the proxy itself
_METADATA_READS = frozenset(
    {
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.ndimension,
        torch.Tensor.numel,
        torch.Tensor.nelement,
        torch.Tensor.element_size,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
        torch.Tensor.get_device,
        torch.Tensor.__len__,
    }
)

#: tensor properties that only describe a tensor (the others, like ``.T``, compute)
_METADATA_PROPERTIES = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "requires_grad",
        "ndim",
        "layout",
        "is_cuda",
        "is_cpu",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "is_mkldnn",
        "is_nested",
        "is_leaf",
        "grad",
        "grad_fn",
        "names",
        "itemsize",
        "nbytes",
        "is_xpu",
        "is_mps",
    }
)
_IN_PLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__"}
)


class FactorizedWeight(torch.Tensor):
    """What ``layer.weight`` gives for a factorized layer: a stand-in for the dense weight.

    Modules written for ``nn.Linear``/``nn.Conv2d`` read their children's ``.weight``:
    ``nn.TransformerEncoderLayer`` hands ``linear1.weight`` to a fused inference kernel,
    Hugging Face code reads ``.weight.dtype``. This tensor has the dense weight's shape,
    dtype, device and ``requires_grad`` but holds no data; metadata reads are answered
    directly, and any computation with it (``F.linear(x, layer.weight)``, ``w.sum()``)
    runs on ``layer.to_dense()`` (differentiable, built at that moment). Because it
    overrides ``__torch_function__``, PyTorch's fused transformer paths see
    ``has_torch_function`` and decline, so the modules call the factorized forward.
    In-place changes (``weight.data.normal_()``, ``weight.copy_(w)``) raise: the weight
    is the product of the cores, change those instead. The layout is the dense layer's
    ``(out_features, in_features[, kh, kw])``.
    """

    _layer: FactorizedLayer

    @staticmethod
    def __new__(cls, layer: FactorizedLayer) -> FactorizedWeight:
        ref = layer.cores[0]
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            layer.geometry.weight_shape,
            dtype=ref.dtype,
            device=ref.device,
            requires_grad=ref.requires_grad,
        )
        t._layer = layer
        return t

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: ARG002
        with torch._C.DisableTorchFunctionSubclass():
            shape, dtype, device = tuple(self.shape), self.dtype, self.device
        return (
            f"FactorizedWeight(shape={shape}, dtype={dtype}, device={device}, "
            f"of {type(self._layer).__name__}; to_dense() gives the values)"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: metadata is answered here, the rest computed
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            if name in _METADATA_PROPERTIES:
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
            if name == "data":  # stays the proxy, so that .data.normal_() raises below
                return args[0]
        elif func in _METADATA_READS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        elif name == "__set__":  # a property set (weight.data = t, weight.requires_grad = f)
            prop = getattr(getattr(func, "__self__", None), "__name__", "?")
            if args and isinstance(args[0], FactorizedWeight):
                layer = args[0]._layer
                raise RuntimeError(
                    f"{type(layer).__name__}.weight is computed from the layer's factors: "
                    f"setting weight.{prop} would change a temporary copy; set it on the "
                    "factors (layer.cores, or layer.requires_grad_(False) to freeze)"
                )
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
            if args and isinstance(args[0], FactorizedWeight):
                layer = args[0]._layer
                raise RuntimeError(
                    f"{type(layer).__name__}.weight is computed from the layer's factors and "
                    f"cannot be changed in place (Tensor.{name}); change layer.cores instead"
                )

        def dense(a: Any) -> Any:
            return a._layer.to_dense() if isinstance(a, FactorizedWeight) else a

        args, kwargs = torch.utils._pytree.tree_map(dense, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(
            f"{func} reached a FactorizedWeight below torch functions (e.g. with torch "
            "function handling disabled); use layer.to_dense() for the dense weight"
        )


class FactorizedLayer(nn.Module):
    """Base of the TT/TR layers: ``from_dense``, ``to_dense``, plan cache, ``extra_repr``.

    Subclasses set ``format_name`` and ``kind`` and call :meth:`_setup`.

    The state dict holds, beside the factors and the bias, a record of what the layer is
    (``<name>._extra_state``: class, format spec and geometry, plain JSON-able data; see
    :meth:`get_extra_state`), so a saved state dict says what it holds and
    :func:`tdcompress.load_compressed` rebuilds the layer from it without decomposing.
    """

    def get_extra_state(self) -> dict[str, Any]:
        """The layer's record: ``{"tdcompress_layer": version, "class", "geometry", "spec"}``
        (lists, ints, strings and bools only: ``torch.load(weights_only=True)`` reads it)."""
        return {
            RECORD_KEY: EXTRA_STATE_VERSION,
            "class": type(self).__name__,
            "geometry": self.geometry.to_dict(),
            "spec": self.spec.to_dict(),
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        _drop_folded(self)  # (new weights: a folded kernel would be stale)
        load_with_record(self, super()._load_from_state_dict, state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded record describes this layer (class, geometry, format, tensor
        shape and ranks); a ValueError says what differs. The spec's options are taken."""
        name = type(self).__name__
        rec = check_record(state, name, ("class", "geometry", "spec"))
        geometry = LayerGeometry.from_dict(dict(rec["geometry"]))
        spec = FactorSpec.from_dict(dict(rec["spec"]))
        if (
            rec["class"] != name
            or geometry != self.geometry
            or structural_spec(spec) != structural_spec(self.spec)
        ):
            raise ValueError(
                f"{name}: the state dict holds a {rec['class']} with {spec.to_dict()} and "
                f"geometry {geometry.to_dict()}, but this layer has {self.spec.to_dict()} and "
                f"geometry {self.geometry.to_dict()}; build the model from the file "
                "(tdcompress.load_compressed) or from the plan it was saved with"
            )
        self.spec = spec

    format_name: ClassVar[str]
    kind: ClassVar[str]
    #: execution choice by input-shape key (see :func:`choose_execution`); each layer gets
    #: its own dict when built, this empty default only serves layers unpickled from older
    #: versions (never mutated: :func:`set_execution` gives the layer its own first)
    _execution: dict[tuple[Any, ...], str] = {}

    geometry: LayerGeometry
    spec: FactorSpec
    structure: RingStructure

    def _setup(
        self,
        geometry: LayerGeometry,
        spec: FactorSpec,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.geometry = geometry
        self.spec = spec
        self.structure = structure_of(geometry, spec)
        self._plans: dict[tuple[int, ...], Any] = {}
        self._execution = {}
        kw = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(s, **kw)) for s in self.structure.shapes]
        )
        if geometry.bias:
            self.bias = nn.Parameter(torch.empty(geometry.out_features, **kw))
        else:
            self.register_parameter("bias", None)
        if not init_skipped():
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random cores whose product has the variance of PyTorch's default dense init,
        ``1 / (3 fan_in)``; bias uniform in ``+-1/sqrt(fan_in)`` as in PyTorch."""
        g = self.geometry
        fan_in = g.in_features * g.kernel_size[0] * g.kernel_size[1]
        target = 1.0 / (3.0 * fan_in)
        n_terms = math.prod(self.structure.ranks[:-1])  # summed bond indices per entry
        d = len(self.structure.shapes)
        std = (target / n_terms) ** (0.5 / d)
        with torch.no_grad():
            for c in self.cores:
                c.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def _format(cls):  # noqa: ANN206 - returns the registered Format
        return get_format(cls.format_name)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: int | Sequence[int],
        *,
        out_factors: Sequence[int] | None = None,
        in_factors: Sequence[int] | None = None,
        layout: str | None = None,
    ) -> FactorizedLayer:
        """Decompose a dense ``nn.Linear``/``nn.Conv2d`` (the format's ``decompose``); the
        bias and stride/padding/dilation are copied."""
        geometry = LayerGeometry.from_module(module)
        if geometry.kind != cls.kind:
            raise TypeError(
                f"{cls.__name__}.from_dense needs an nn."
                f"{'Linear' if cls.kind == 'linear' else 'Conv2d'}, got {type(module).__name__}"
            )
        fmt = cls._format()
        spec = fmt.resolve(
            geometry,
            ranks if isinstance(ranks, int) else tuple(ranks),
            out_factors=None if out_factors is None else tuple(out_factors),
            in_factors=None if in_factors is None else tuple(in_factors),
            layout=layout,
            layer_name=f"{cls.__name__}.from_dense",
        )
        w = module.weight.detach()
        b = None if module.bias is None else module.bias.detach()
        return build(fmt, geometry, fmt.decompose(w, spec), spec, b)

    @classmethod
    def from_factors(
        cls,
        geometry: LayerGeometry,
        factors: Sequence[torch.Tensor],
        spec: FactorSpec,
        bias: torch.Tensor | None = None,
    ) -> FactorizedLayer:
        """A layer holding copies of ``factors`` (parameter-shaped cores) and ``bias``
        (``out_features`` values; only for a geometry with ``bias=True``)."""
        if bias is not None:
            if not geometry.bias:
                raise ValueError(
                    f"{cls.__name__}: bias given for a geometry with bias=False; "
                    "plan the layer with bias=True or pass bias=None"
                )
            if bias.numel() != geometry.out_features:
                raise ValueError(
                    f"{cls.__name__}: bias must have out_features={geometry.out_features} "
                    f"values, got shape {tuple(bias.shape)}"
                )
        f0 = factors[0]
        layer = cls._from_spec(geometry, spec, device=f0.device, dtype=f0.dtype)
        if len(factors) != len(layer.cores):
            raise ValueError(
                f"{cls.__name__}: expected {len(layer.cores)} factors, got {len(factors)}"
            )
        with torch.no_grad():
            for k, (p, f) in enumerate(zip(layer.cores, factors)):
                if tuple(f.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{cls.__name__}: factors[{k}] has shape {tuple(f.shape)}, "
                        f"expected {tuple(p.shape)}"
                    )
                p.copy_(f)
            if layer.bias is not None:
                if bias is None:
                    layer.bias.zero_()
                else:
                    layer.bias.copy_(bias.reshape(-1))
        return layer

    @classmethod
    def _from_spec(
        cls, geometry: LayerGeometry, spec: FactorSpec, device: Any = None, dtype: Any = None
    ) -> FactorizedLayer:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state (``torch.save(model)``, ``copy.deepcopy``) without a dense
        kernel kept for eager inference (:func:`folded_weight`)."""
        state = dict(super().__getstate__())
        state.pop("_folded", None)
        if _is_frozen(state.get("forward")):  # (fold_kernels' frozen forward)
            del state["forward"]
        if FOLDED in state.get("_buffers", {}):
            state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != FOLDED}
        return state

    def train(self, mode: bool = True) -> FactorizedLayer:
        """``nn.Module.train``; also drops a dense kernel kept for eager inference
        (:func:`folded_weight`), whose memory training does not need."""
        if mode:
            _drop_folded(self)
        return super().train(mode)

    def to_dense(self) -> torch.Tensor:
        """The full weight, with the dense layer's weight shape (differentiable)."""
        return self.structure.reconstruct(list(self.cores))

    def dense_module(self) -> nn.Module:
        """The PyTorch layer computing this layer's function: an ``nn.Linear`` or
        ``nn.Conv2d`` with weight ``to_dense()`` and this layer's bias, stride, padding,
        dilation and groups (a new module, in this layer's training mode)."""
        g = self.geometry
        with torch.no_grad():
            w = self.to_dense().detach()
            kw: dict[str, Any] = {"device": w.device, "dtype": w.dtype, "bias": g.bias}
            if g.kind == "linear":
                dense = nn.utils.skip_init(nn.Linear, g.in_features, g.out_features, **kw)
            else:
                dense = nn.utils.skip_init(
                    nn.Conv2d,
                    g.in_features,
                    g.out_features,
                    g.kernel_size,
                    stride=g.stride,
                    padding=g.padding,
                    dilation=g.dilation,
                    groups=g.groups,
                    **kw,
                )
            dense.weight.copy_(w)
            if g.bias:
                dense.bias.copy_(self.bias)
        return dense.train(self.training)

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in for the dense weight (:class:`FactorizedWeight`): its shape, dtype and
        device without building it; any computation with it uses :meth:`to_dense`. Modules
        that read ``.weight`` to pick a fused dense kernel (``nn.TransformerEncoderLayer``
        in eval mode) see it and fall back to calling this layer. Exception: without
        autograd, a layer that runs some input shape rebuilt gives its kept dense kernel
        (:func:`folded_weight`), a plain tensor, so such modules run their fused kernel with
        it, as they would with the dense layer (under ``torch.compile``: the
        kernel of :func:`fold_kernels`). Otherwise, under ``torch.compile`` (dynamo) it is
        ``to_dense()``, computed in the graph."""
        modes = self._execution
        if modes and "rebuilt" in modes.values():
            w = folded_weight(self)
            if w is not None:
                return w
        if _compiler_flag("is_dynamo_compiling"):  # (dynamo cannot build the stand-in: a
            return self.to_dense()  # graph break; in the graph it is rebuilt from the cores)
        return FactorizedWeight(self)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.spec.ranks)

    def _shape_repr(self) -> str:
        s = self.spec
        txt = f"out_factors={s.out_factors}, in_factors={s.in_factors}, ranks={s.ranks}"
        if s.layout:
            txt += f", layout={s.layout!r}"
        return txt


def conv_forward(
    layer: FactorizedLayer, x: torch.Tensor, weight_bias: torch.Tensor | None
) -> torch.Tensor:
    """Forward of a TT/TR Conv2d layer, with its plan for this input shape (cached)."""
    st, g = layer.structure, layer.geometry
    if x.dim() != 4 or x.shape[1] != g.in_features:
        raise ValueError(
            f"{type(layer).__name__}: input must have shape (N, {g.in_features}, H, W), "
            f"got {tuple(x.shape)}"
        )
    chosen = run_chosen(layer, x)
    if chosen is not None:
        return chosen
    # B plans (the reshapes leave the batch to run time: -1); H and W are static
    B, H, W = batch_key(x.shape[0]), int(x.shape[2]), int(x.shape[3])
    # channels_last input: 1x1 stages as convs (GEMMs on the NHWC layout), output NHWC
    nhwc = is_channels_last(x)
    key = (B, H, W, nhwc)
    plan = layer._plans.get(key)
    if plan is None:
        mode = "conv" if nhwc and st.layout == "channel" else None
        plan = cache_plan(
            layer._plans,
            key,
            lambda: st.plan_conv(
                planned_batch(layer._plans, key),
                (H, W),
                g.output_hw((H, W)),
                pre_mode=mode,
                post_mode=mode,
            ),
        )
    cores = list(layer.cores)
    conv = {"stride": g.stride, "padding": g.padding, "dilation": g.dilation}
    kh, kw = st.kernel_size
    r0 = st.ranks[0]
    if plan.kind == "dense":
        return F.conv2d(x, st.reconstruct(cores), weight_bias, **conv)
    if plan.kind == "spatial_first":
        post = plan.post
        assert post is not None
        sp = cores[0]  # (r0, kh, kw, r1)
        w = sp.permute(0, 3, 1, 2).reshape(-1, 1, kh, kw)
        t = F.conv2d(x.reshape(-1, 1, H, W), w, None, **conv)
        Ho, Wo = t.shape[-2], t.shape[-1]
        t = t.reshape(-1, *st.inf, r0, st.ranks[1], Ho * Wo)
        y = run_steps(post.steps, [t, *cores[1:]])
        return _add_bias(y.reshape(-1, g.out_features, Ho, Wo), weight_bias)
    a = len(st.of)
    ra, ra1 = st.ranks[a], st.ranks[a + 1]
    out_cores, kern, in_cores = cores[:a], cores[a], cores[a + 1 :]
    if plan.kind == "merge_in":
        w = run_merge(plan.weight, [kern, *in_cores]).reshape(r0 * ra, -1, kh, kw)
        t = F.conv2d(x, w, None, **conv)
    else:
        pre = plan.pre
        assert pre is not None
        if pre.mode == "conv":
            w = run_merge(pre.merge, in_cores).reshape(r0 * ra1, -1, 1, 1)
            t = F.conv2d(x, w)
        else:
            t = run_steps(pre.steps, [x.reshape(-1, *st.inf, H * W), *in_cores])
            t = t.reshape(-1, r0 * ra1, H, W)
        if plan.kind == "merge_out":
            w = run_merge(plan.weight, [*out_cores, kern]).reshape(-1, r0 * ra1, kh, kw)
            return F.conv2d(t, w, weight_bias, **conv)
        w = kern.permute(0, 3, 1, 2)  # (ra, ra1, kh, kw)
        t = t.reshape(-1, ra1, H, W)
        training = torch.is_grad_enabled() and not torch.jit.is_tracing()
        if nhwc or (training and (B != 1 or r0 > 1)):  # (B may be DYNAMIC)
            # oneDNN's backward of a conv with few channels is 2-4x faster in NHWC; the
            # forward alone gains nothing from the conversion
            t = t.contiguous(memory_format=torch.channels_last)
        t = F.conv2d(t, w, None, **conv)
        if not nhwc:
            t = t.contiguous()
    Ho, Wo = t.shape[-2], t.shape[-1]
    post = plan.post
    assert post is not None
    if post.mode == "conv":
        w = run_merge(post.merge, out_cores).reshape(g.out_features, r0 * ra, 1, 1)
        return F.conv2d(t.reshape(-1, r0 * ra, Ho, Wo), w, weight_bias)
    y = run_steps(post.steps, [t.reshape(-1, r0, ra, Ho * Wo), *out_cores])
    return _add_bias(y.reshape(-1, g.out_features, Ho, Wo), weight_bias)


#: plans kept per layer (one per distinct input shape); the cache is cleared beyond this
MAX_PLANS = 64


@torch.compiler.disable
def cache_plan(plans: dict, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, stored in a layer's plan cache ``plans`` under ``key``.

    Called on a cache miss only: the lookup itself (``plans.get(key)``) stays in the
    forward, where ``torch.compile`` traces it as a constant, while planning (a search in
    plain Python) runs outside the compiled graph. Warm the caches before compiling
    (:func:`warm_plans`) and the compiled forward has no graph break."""
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = plan = make()
    return plan


def warm_plans(
    model: nn.Module,
    input_shapes: Sequence[Sequence[int]],
    *,
    channels_last: bool = False,
    device: torch.device | str | None = None,
) -> int:
    """Run ``model`` once per input shape (zeros of its parameters' dtype, on ``device`` or
    theirs; eval mode, no grad; BatchNorm statistics and RNG untouched) so that every
    factorized layer has its contraction plan for the shapes it will see. Call before
    ``torch.compile``. Each shape with a batch of at least 2 also serves a batch that
    ``torch.compile`` leaves symbolic (``dynamic=True``; :data:`DYNAMIC`), with the plan of
    the largest such batch warmed. Returns the number of factorized layers."""
    layers = [m for m in model.modules() if hasattr(m, "_plans")]
    if not layers:
        return 0
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for shape in input_shapes:
                x = torch.zeros(tuple(shape), device=device, dtype=dtype)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                model(x)
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t
    for m in layers:  # the plans for a symbolic batch: those of the largest warmed batch
        for dk in {(DYNAMIC, *k[1:]) for k in m._plans if k[0] >= 2}:
            m._plans[dk] = m._plans[(planned_batch(m._plans, dk), *dk[1:])]
    return len(layers)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (in y's dtype, as nn.Conv2d under autocast: a float32 bias would promote a bf16 y)
    return y if bias is None else y + bias.to(y.dtype).reshape(1, -1, 1, 1)


def linear_forward(layer: FactorizedLayer, x: torch.Tensor) -> torch.Tensor:
    """Forward of a TT/TR Linear layer over any leading dims, plan cached per batch size."""
    st, g = layer.structure, layer.geometry
    if x.dim() < 1 or x.shape[-1] != g.in_features:
        raise ValueError(
            f"{type(layer).__name__}: input must have last dimension {g.in_features}, "
            f"got shape {tuple(x.shape)}"
        )
    chosen = run_chosen(layer, x)
    if chosen is not None:
        return chosen
    lead = x.shape[:-1]  # (symbolic under a dynamic-batch export: left to run time)
    key = (batch_key(math.prod(lead)) if lead else 1,)
    plan = layer._plans.get(key)
    if plan is None:
        plan = cache_plan(
            layer._plans, key, lambda: st.plan_linear(planned_batch(layer._plans, key))[0]
        )
    y = run_steps(plan, [x.reshape(-1, *st.inf), *layer.cores])
    y = y.reshape(*lead, g.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


# ---- execution choice: factorized contraction or dense kernel rebuilt from the cores --------
#
# Kept apart from the plan caches above: a layer's ``_execution`` maps an input-shape key
# (:func:`execution_key`) to a mode of :data:`EXECUTION_MODES`. It is empty unless
# :func:`choose_execution` (or :func:`set_execution`) filled it, and then the forward runs
# "rebuilt" keys as one dense op on ``to_dense()``. The choice is a measurement of this
# machine, so it is not part of the state dict (nor of the layer's extra-state record): a
# model loaded elsewhere runs factorized until chosen again there.

#: how a factorized layer runs an input shape: ``"factorized"`` (its planned contraction of
#: the activation with the cores) or ``"rebuilt"`` (the dense weight computed from the cores
#: inside the forward, then one ``F.linear``/``F.conv2d``; in an exported graph the rebuild
#: is a subgraph of the cores, which a runtime folds once at load)
EXECUTION_MODES = ("factorized", "rebuilt")


def execution_key(layer: FactorizedLayer, x: torch.Tensor) -> tuple[Any, ...]:
    """The key of ``layer``'s execution choice for the input ``x``: ``(rows,)`` for a
    linear layer, ``(batch, H, W)`` for a conv; the batch entry is :func:`batch_key`'s
    (:data:`DYNAMIC` while ``torch.compile`` traces a batch >= 2). The memory layout is not
    part of it: a layer's input layout may depend on the modes of the layers before it."""
    if layer.geometry.kind == "linear":
        lead = x.shape[:-1]
        return (batch_key(math.prod(lead)) if lead else 1,)
    return (batch_key(x.shape[0]), int(x.shape[2]), int(x.shape[3]))


def rebuilt_forward(
    layer: FactorizedLayer, x: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``layer``'s output through its dense weight: ``weight`` (precomputed) or
    ``layer.to_dense()`` rebuilt here (differentiable: gradients reach the cores)."""
    w = layer.to_dense() if weight is None else weight
    g = layer.geometry
    if g.kind == "linear":
        return F.linear(x, w, layer.bias)
    # the weight in the input's layout: ATen gives the conv output the weight's layout when
    # they differ, and a rebuilt weight may have any strides
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return F.conv2d(
        x,
        w.contiguous(memory_format=fmt),
        layer.bias,
        stride=g.stride,
        padding=g.padding,
        dilation=g.dilation,
        groups=g.groups,
    )


def chosen_mode(layer: FactorizedLayer, x: torch.Tensor) -> str:
    """The mode ``layer`` runs ``x`` in: its choice for ``x``'s key, else its choice for
    :data:`ANY_SHAPE`, else ``"factorized"``. A lookup in a plain dict, so ``torch.compile``
    traces it as a constant (no graph break; a changed choice recompiles through the dict's
    guard)."""
    modes = layer._execution
    if not modes:
        return "factorized"
    return modes.get(execution_key(layer, x), modes.get(ANY_SHAPE, "factorized"))


def run_chosen(layer: FactorizedLayer, x: torch.Tensor) -> torch.Tensor | None:
    """The forward of a layer whose execution choice for ``x`` is ``"rebuilt"`` (through
    :func:`folded_weight`); ``None`` otherwise (the caller runs its factorized plan). Called
    by every factorized forward once its input is validated."""
    if chosen_mode(layer, x) == "rebuilt":
        return rebuilt_forward(layer, x, folded_weight(layer))
    return None


#: the key of a layer's execution choice for every input shape without a choice of its own
#: (``set_execution(layer, ANY_SHAPE, "rebuilt")``: e.g. rebuilt in training)
ANY_SHAPE: tuple[Any, ...] = ()

_no_folding = threading.local()


@contextlib.contextmanager
def folding(enabled: bool) -> Iterator[None]:
    """Allow (default) or forbid :func:`folded_weight`'s kept kernel within the block, in
    this thread (forbidden: eager inference rebuilds the kernel in every call, as training
    and compiled graphs do)."""
    old = getattr(_no_folding, "on", False)
    _no_folding.on = not enabled
    try:
        yield
    finally:
        _no_folding.on = old


def _compiler_flag(name: str) -> bool:
    fn = _COMPILER_FLAGS.get(name)
    if fn is None:
        fn = _COMPILER_FLAGS[name] = getattr(torch.compiler, name, lambda: False)
    return bool(fn())


_COMPILER_FLAGS: dict[str, Callable[[], bool]] = {}


_is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", lambda: False)


def _exporting() -> bool:
    """True while tracing (``torch.jit``) or exporting (``torch.export``, ONNX)."""
    return torch.jit.is_tracing() or _is_exporting()


def _eager_inference() -> bool:
    """True in eager PyTorch without autograd: not tracing, compiling or exporting."""
    if torch.is_grad_enabled() or _exporting():
        return False
    return not (_compiler_flag("is_compiling") or _compiler_flag("is_dynamo_compiling"))


#: the buffer name of a kernel kept by :func:`fold_kernels` (not saved in the state dict)
FOLDED = "folded_kernel"


def folded_weight(layer: FactorizedLayer) -> torch.Tensor | None:
    """The dense kernel of ``layer`` computed once and kept, for inference without autograd:
    as ONNX Runtime folds the rebuild at load, inference then runs a rebuilt layer at the
    dense layer's speed, for one dense kernel of memory per rebuilt layer.

    After :func:`fold_kernels` it is the kernel kept then (eager and compiled graphs alike;
    a freeze: in-place changes of the parameters are not seen until ``train()``,
    ``load_state_dict`` or :func:`unfold_kernels`). Otherwise, in eager PyTorch, the kernel
    is kept on first use and recomputed when any parameter of the layer changes (identity,
    storage or version counter: an optimizer step, ``load_state_dict``, ``.to()``), and
    ``train()`` drops it. ``None`` under autograd, tracing or export (and under compile
    without a folded kernel, or within ``folding(False)``): the caller rebuilds the kernel
    in the forward, so gradients reach the cores and exported files keep them."""
    if getattr(_no_folding, "on", False) or torch.is_grad_enabled() or _exporting():
        return None
    frozen = layer._buffers.get(FOLDED)
    if frozen is not None:  # (fold_kernels froze it: eager and compiled graphs alike)
        return frozen
    if _compiler_flag("is_compiling") or _compiler_flag("is_dynamo_compiling"):
        return None
    key = _weights_key(layer)
    kept = layer.__dict__.get("_folded")
    if kept is not None and kept[0] == key:
        return kept[1]
    w = layer.to_dense()
    layer.__dict__["_folded"] = (key, w)
    return w


def _weights_key(layer: nn.Module) -> tuple[Any, ...]:
    """What a kept kernel of ``layer`` depends on: each parameter's identity, storage,
    version counter, dtype and device (read from the layer's own and its direct children's
    parameter dicts, where factorized layers keep theirs: cheap enough for every call)."""
    own = layer._parameters.values()
    kids = (p for m in layer._modules.values() for p in m._parameters.values())
    return tuple(
        (id(p), p.data_ptr(), p._version, p.dtype, p.device)
        for group in (own, kids)
        for p in group
        if p is not None
    )


def fold_kernels(model: nn.Module, channels_last: bool = False) -> list[str]:
    """Freeze ``model`` for inference in PyTorch (eager or ``torch.compile``), as
    ``torch.jit.freeze`` does: every factorized layer that runs some input shape
    ``"rebuilt"`` computes its dense kernel now and keeps it as a non-persistent buffer
    (``folded_kernel``: not in the state dict, nor in a pickled module, nor in an exported
    file, which rebuilds it from the cores), as ONNX Runtime folds it at load. In eager
    inference such a layer then forwards the shapes it runs rebuilt straight to
    ``F.linear`` / ``F.conv2d`` on it (about the cost of the dense layer's call; convolution
    kernels in the channels_last layout if ``channels_last``); compiled graphs read it
    through :func:`folded_weight`. Call it after the execution choice and once the weights are
    final: in-place changes of the parameters afterwards are not seen until ``train()``,
    ``load_state_dict`` or :func:`unfold_kernels`, which drop the kernels (with autograd on
    the layers always run from their cores). Returns the names of the layers folded."""
    names = []
    with torch.no_grad():
        for name, m in model.named_modules():
            modes = getattr(m, "_execution", None) if _is_factorized(m) else None
            if modes and "rebuilt" in modes.values():
                _drop_folded(m)
                w = m.to_dense().detach()
                if channels_last and w.dim() == 4:  # (compiled graphs then copy nothing)
                    w = w.contiguous(memory_format=torch.channels_last)
                m.register_buffer(FOLDED, w, persistent=False)
                m.__dict__["_folded"] = (_weights_key(m), w)
                m.__dict__["forward"] = _frozen_forward(m, w, channels_last)
                names.append(name)
    return names


def unfold_kernels(model: nn.Module) -> list[str]:
    """Undo :func:`fold_kernels`: the layers drop their kept kernels (and run from their
    cores again, a rebuilt kernel kept per call in eager inference as before)."""
    names = []
    for name, m in model.named_modules():
        if _is_factorized(m) and FOLDED in m._buffers:
            _drop_folded(m)
            names.append(name)
    return names


_is_grad_enabled = torch.is_grad_enabled


def _frozen_forward(
    layer: FactorizedLayer, kernel: torch.Tensor, channels_last: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward :func:`fold_kernels` gives a layer that runs some shape rebuilt: in
    inference, the dense op on ``kernel`` for the shapes chosen rebuilt (every shape if
    all are: then also under ``torch.compile``, whose guards on this path cost about two
    thirds of those on the layer's own forward: ResNet-32 TT, 48 instead of 67 us per call,
    dense 29); otherwise (autograd, export, compile with some shapes factorized, shapes run
    factorized) the layer's own forward."""
    own = type(layer).forward.__get__(layer)
    bias, g, modes = layer.bias, layer.geometry, layer._execution
    every = all(v == "rebuilt" for v in modes.values())

    def rebuilt_here(x: torch.Tensor) -> bool:
        if _is_grad_enabled() or _exporting():
            return False
        if every:  # (also under torch.compile: a graph of the dense op, with few guards)
            return True
        if _compiler_flag("is_dynamo_compiling"):
            return False
        if g.kind == "linear":
            key: tuple[Any, ...] = (math.prod(x.shape[:-1]) if x.dim() > 1 else 1,)
        else:
            key = (x.shape[0], x.shape[2], x.shape[3]) if x.dim() == 4 else ()
        return modes.get(key, modes.get(ANY_SHAPE)) == "rebuilt"

    if g.kind == "linear":

        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, kernel, bias) if rebuilt_here(x) else own(x)

        forward._tdcompress_frozen = True  # type: ignore[attr-defined]
        return forward
    k = kernel.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    stride, padding, dilation, groups = g.stride, g.padding, g.dilation, g.groups

    def forward_conv(x: torch.Tensor) -> torch.Tensor:
        if rebuilt_here(x):
            return F.conv2d(x, k, bias, stride, padding, dilation, groups)
        return own(x)

    forward_conv._tdcompress_frozen = True  # type: ignore[attr-defined]
    return forward_conv


def _drop_folded(layer: nn.Module) -> None:
    layer.__dict__.pop("_folded", None)
    if _is_frozen(layer.__dict__.get("forward")):  # (not an instance forward of others)
        del layer.__dict__["forward"]
    layer._buffers.pop(FOLDED, None)


def _is_frozen(fn: Any) -> bool:
    return getattr(fn, "_tdcompress_frozen", False)


def set_execution(layer: FactorizedLayer, key: tuple[Any, ...], mode: str) -> None:
    """Make ``layer`` run inputs of ``key`` (:func:`execution_key`; :data:`ANY_SHAPE`: every
    shape without a choice of its own) in ``mode``."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"mode must be one of {list(EXECUTION_MODES)}, got {mode!r}")
    if "_execution" not in layer.__dict__:  # (a layer unpickled from an older tdcompress)
        layer._execution = {}
    layer._execution[tuple(key)] = mode


def set_model_execution(model: nn.Module, mode: str) -> list[str]:
    """Make every factorized layer of ``model`` run every input shape without a choice of
    its own in ``mode`` (:data:`ANY_SHAPE`); e.g. ``"rebuilt"`` for training, where one
    dense GEMM on the kernel rebuilt from the cores (gradients reach the cores through the
    rebuild) often beats the factorized contraction at large batches. Returns the layers'
    names."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"mode must be one of {list(EXECUTION_MODES)}, got {mode!r}")
    names = [n for n, m in model.named_modules() if _is_factorized(m)]
    for n in names:
        set_execution(model.get_submodule(n), ANY_SHAPE, mode)  # type: ignore[arg-type]
    return names


def execution_modes(model: nn.Module) -> dict[str, dict[tuple[Any, ...], str]]:
    """Every factorized layer's chosen modes by key, by module name (empty: factorized)."""
    return {name: dict(m._execution) for name, m in model.named_modules() if _is_factorized(m)}


def rebuilt_everywhere(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run only as dense ops: factorized layers
    whose every execution choice is ``"rebuilt"``, and ``FactorizedLSTM``s whose input
    layers are all plain ``nn.Linear`` or such layers (what :func:`tdcompress.densify` may
    turn into PyTorch's layers for inference without changing what runs; a deployment in
    PyTorch then runs them as the dense model does, without the factorized layer's
    per-call checks and ``torch.compile`` guards)."""

    def dense_only(m: nn.Module) -> bool:
        if type(m) is nn.Linear:
            return True
        modes = getattr(m, "_execution", None) if _is_factorized(m) else None
        return bool(modes) and all(v == "rebuilt" for v in modes.values())

    out, lstms = [], []
    for name, m in model.named_modules():
        layers = getattr(m, "input_layers", None)
        if hasattr(m, "time_recurrence") and layers is not None:  # (FactorizedLSTM)
            lstms.append(name)
            if all(dense_only(x) for x in layers):
                out.append(name)
        elif _is_factorized(m) and dense_only(m):
            if not any(n == "" or name.startswith(f"{n}.") for n in lstms):  # (the LSTM's)
                out.append(name)
    return out


def rebuilt_layers(model: nn.Module) -> list[str]:
    """Names of the factorized layers of ``model`` that run some input shape rebuilt."""
    return [n for n, modes in execution_modes(model).items() if "rebuilt" in modes.values()]


def clear_execution(model: nn.Module) -> None:
    """Forget every execution choice: all factorized layers run factorized again."""
    for m in model.modules():
        if _is_factorized(m) and m._execution:
            m._execution = {}


def _is_factorized(m: nn.Module) -> bool:
    return isinstance(m, FactorizedLayer)


@dataclass(frozen=True)
class ExecutionRecord:
    """One layer's execution choice for one input shape (:func:`choose_execution`):
    median seconds of each mode (``None`` when forced) and the mode chosen. For a
    :class:`~tdcompress.layers.FactorizedLSTM`'s recurrence (mode ``"per_step"`` or
    ``"fused"``, key ``(batch, T)``), ``factorized_s`` is the per-step loop's time and
    ``rebuilt_s`` the fused kernel's."""

    layer: str
    input_shape: tuple[int, ...]
    key: tuple[Any, ...]
    mode: str
    factorized_s: float | None = None
    rebuilt_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "input_shape": list(self.input_shape),
            "key": list(self.key),
            "mode": self.mode,
            "factorized_s": self.factorized_s,
            "rebuilt_s": self.rebuilt_s,
        }


def choose_execution(
    model: nn.Module,
    input_shapes: Sequence[Sequence[int]],
    *,
    repeats: int = 20,
    warmup: int = 3,
    folded: bool = False,
    margin: float = 0.02,
    force: str | None = None,
    channels_last: bool = False,
    device: torch.device | str | None = None,
    compiled: bool = False,
) -> list[ExecutionRecord]:
    """Measure, for every factorized layer of ``model`` and every input shape, whether its
    factorized contraction or the dense kernel rebuilt from its cores runs faster here, and
    make the layer run the faster one (for that shape; other shapes stay as they were).

    Each layer is timed on the input it gets in a forward of zeros of each shape (eval mode,
    no grad; BatchNorm statistics untouched), on the model's device, both modes interleaved
    ``warmup + repeats`` times; the medians of the last ``repeats`` decide: the other mode
    must be at least ``margin`` (a fraction) faster than the default, which is
    ``"factorized"``, or ``"rebuilt"`` with ``folded`` (a kept kernel runs as the dense
    layer does). ``folded``: time the rebuilt mode with
    the dense weight computed once, as eager inference (:func:`folded_weight`) and a runtime
    that folds the rebuild at load (ONNX Runtime) run it; by default the rebuild is timed in
    every call, as training and ``torch.compile`` run it (a choice for both: time the
    rebuild). ``force``: set that mode everywhere without timing. Plans are
    warmed first (:func:`warm_plans`); a shape with a batch >= 2 also sets the choice for a
    batch ``torch.compile`` leaves symbolic (that of the largest such batch), so call this
    before compiling or exporting. A :class:`~tdcompress.layers.FactorizedLSTM` whose wide
    input layer then runs factorized also gets its recurrence mode for the shape
    (:meth:`~tdcompress.layers.FactorizedLSTM.time_recurrence`: per step or PyTorch's fused
    kernel, as exported graphs run it too). ``compiled`` (with ``folded``): for a model that
    will run under ``torch.compile``, whose kernels differ from eager's, the whole-model
    check of each shape times the model compiled (``dynamic=False``, folded), the choices
    against every layer rebuilt (two compiles per shape). Returns one record per layer and
    key."""
    if force is not None and force not in EXECUTION_MODES:
        raise ValueError(f"force must be None or one of {list(EXECUTION_MODES)}, got {force!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if compiled and not folded:
        raise ValueError(
            "compiled=True checks the choice on the model as compiled after fold_kernels; "
            "it needs folded=True"
        )
    named = [(n, m) for n, m in model.named_modules() if _is_factorized(m)]
    if not named:
        return []
    # (modules with a recurrence mode of their own: FactorizedLSTM)
    recurrent = [(n, m) for n, m in model.named_modules() if hasattr(m, "time_recurrence")]
    warm_plans(model, input_shapes, channels_last=channels_last, device=device)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    records: list[ExecutionRecord] = []
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for shape in input_shapes:
                seen: list[tuple[str, FactorizedLayer, tuple[Any, ...], torch.Tensor]] = []
                handles = [m.register_forward_pre_hook(_grab(n, seen)) for n, m in named]
                lstm_inputs: list[tuple[str, nn.Module, torch.Tensor]] = []
                handles += [
                    m.register_forward_pre_hook(_grab_input(n, lstm_inputs)) for n, m in recurrent
                ]
                try:
                    x = torch.zeros(tuple(shape), device=device, dtype=dtype)
                    if channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    model(x)
                finally:
                    for h in handles:
                        h.remove()
                done: set[tuple[int, tuple[Any, ...]]] = set()
                start = len(records)
                for name, layer, key, xin in seen:
                    if (id(layer), key) in done:  # (a module called twice per forward)
                        continue
                    done.add((id(layer), key))
                    if force is not None:
                        set_execution(layer, key, force)
                        records.append(ExecutionRecord(name, tuple(xin.shape), key, force))
                        continue
                    t_f, t_r = _time_modes(layer, key, xin, repeats, warmup, folded)
                    if folded:  # (a kept kernel runs as the dense layer: rebuilt unless
                        # the factorized contraction is faster by the margin)
                        mode = "factorized" if t_f < t_r * (1.0 - margin) else "rebuilt"
                    else:
                        mode = "rebuilt" if t_r < t_f * (1.0 - margin) else "factorized"
                    set_execution(layer, key, mode)
                    records.append(ExecutionRecord(name, tuple(xin.shape), key, mode, t_f, t_r))
                if folded and force is None:
                    _whole_model_check(
                        model, x, records, start, done, repeats, channels_last, compiled, margin
                    )
                if force is None:  # (with the layers' modes for this shape settled)
                    records += _choose_recurrences(lstm_inputs, repeats, warmup)
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t
    for _, m in named:  # a batch left symbolic: the choice of the largest batch of that shape
        _dynamic_choice(m._execution)
    for _, m in recurrent:
        _dynamic_choice(m.__dict__.get("_recurrence", {}))
    return records


def _dynamic_choice(modes: dict[tuple[Any, ...], str]) -> None:
    """Give ``modes`` (keyed ``(batch, ...)``) the choice for a symbolic batch (:data:`DYNAMIC`)
    of each shape: that of its largest batch >= 2."""
    sized = [k for k in modes if k and k[0] >= 2]  # (not ANY_SHAPE, not DYNAMIC)
    for rest in {k[1:] for k in sized}:
        big = max(k[0] for k in sized if k[1:] == rest)
        modes[(DYNAMIC, *rest)] = modes[(big, *rest)]


def _choose_recurrences(
    seen: list[tuple[str, nn.Module, torch.Tensor]],
    repeats: int,
    warmup: int,
) -> list[ExecutionRecord]:
    """Time each recurrent module on the input it got (``time_recurrence``: per step against
    fused) and set the faster mode for its key; records whose ``factorized_s`` is the
    per-step time and ``rebuilt_s`` the fused one."""
    records: list[ExecutionRecord] = []
    done: set[tuple[int, tuple[Any, ...]]] = set()
    for name, m, x in seen:
        key = m.recurrence_key(x)  # type: ignore[operator]
        if (id(m), key) in done:
            continue
        done.add((id(m), key))
        times = m.time_recurrence(x, repeats, warmup)  # type: ignore[operator]
        if times is None:
            continue
        mode = "fused" if times[1] <= times[0] else "per_step"
        m.set_recurrence(key, mode)  # type: ignore[operator]
        records.append(ExecutionRecord(name, tuple(x.shape), key, mode, *times))
    return records


#: seconds one timed sample of the whole-model check lasts at least (several forwards)
CHECK_SAMPLE_SECONDS = 0.004


def _whole_model_check(
    model: nn.Module,
    x: torch.Tensor,
    records: list[ExecutionRecord],
    start: int,
    done_keys: set[tuple[int, tuple[Any, ...]]],
    repeats: int,
    channels_last: bool = False,
    compiled: bool = False,
    margin: float = 0.02,
) -> None:
    """A layer timed alone can look faster factorized yet slow the model down (the layout or
    strides of its output, caches, per-call overhead). So time the whole forward on ``x``
    with the per-layer choices against every layer rebuilt, each as a copy of the model
    deployed as in PyTorch (what runs rebuilt as PyTorch's own layers: the dense model, for
    every layer rebuilt; ``compiled``: under ``torch.compile``), interleaved medians, and
    keep every layer rebuilt for this shape unless the choices are faster by ``margin``;
    the records of this shape (``records[start:]``) follow."""
    import copy
    import time

    layers = {id(m): m for m in model.modules() if _is_factorized(m)}
    pairs = [(layers[i], key) for i, key in done_keys if i in layers]
    chosen = {(id(m), key): m._execution.get(key) for m, key in pairs}
    if all(v == "rebuilt" for v in chosen.values()):
        return

    def set_modes(all_rebuilt: bool) -> None:
        for m, key in pairs:
            set_execution(m, key, "rebuilt" if all_rebuilt else chosen[(id(m), key)])

    # a copy per setting, deployed: this shape's modes only (as if deployed for it alone),
    # the modules that then run only dense ops as PyTorch's layers (compiled: warmed)
    runs = {}
    names = {id(m): n for n, m in model.named_modules()}
    for flag in (True, False):
        set_modes(flag)
        twin = copy.deepcopy(model)
        for m, key in pairs:
            layer = twin.get_submodule(names[id(m)])
            layer._execution = {key: m._execution[key]}
        twin = _with_dense_modules(twin, channels_last)
        fold_kernels(twin, channels_last)
        runs[flag] = torch.compile(twin, dynamic=False) if compiled else twin
        runs[flag](x)

    # each sample several forwards lasting at least CHECK_SAMPLE_SECONDS: a fast forward
    # timed once is at the mercy of a scheduler tick (a wrong choice costs every call after)
    t0 = time.perf_counter()
    runs[True](x)
    calls = max(1, min(64, math.ceil(CHECK_SAMPLE_SECONDS / (time.perf_counter() - t0))))
    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(3 + repeats):
        for flag in (True, False) if k % 2 == 0 else (False, True):
            t0 = time.perf_counter()
            for _ in range(calls):
                runs[flag](x)
            if k >= 3:
                times[flag].append(time.perf_counter() - t0)
    rebuilt_all = not _median(times[False]) < _median(times[True]) * (1.0 - margin)
    set_modes(rebuilt_all)
    if any(FOLDED in m._buffers for m in layers.values()):  # (folded before: it stays so)
        fold_kernels(model, channels_last)
    if rebuilt_all:
        for i in range(start, len(records)):
            records[i] = dataclasses.replace(records[i], mode="rebuilt")


def _with_dense_modules(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """``model`` (changed in place) with the modules of :func:`rebuilt_everywhere` replaced by
    their ``dense_module()`` (PyTorch's own layers; convolutions in channels_last if
    ``channels_last``)."""
    for name in rebuilt_everywhere(model):
        dense = model.get_submodule(name).dense_module()  # type: ignore[operator]
        if channels_last:
            dense = dense.to(memory_format=torch.channels_last)
        if not name:  # (the model itself)
            return dense
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, dense)
    return model


def _grab(name: str, sink: list) -> Callable[..., None]:
    """A forward pre-hook appending ``(name, module, key, copy of the input)`` to ``sink``."""

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]  # (the key of the input itself: a copy may have other strides)
        sink.append((name, mod, execution_key(mod, x), _copy_strided(x)))  # type: ignore[arg-type]

    return hook


def _grab_input(name: str, sink: list) -> Callable[..., None]:
    """A forward pre-hook appending ``(name, module, copy of the input)`` to ``sink``."""

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        sink.append((name, mod, _copy_strided(args[0])))

    return hook


def _time_modes(
    layer: FactorizedLayer,
    key: tuple[Any, ...],
    x: torch.Tensor,
    repeats: int,
    warmup: int,
    folded: bool,
) -> tuple[float, float]:
    """Median seconds of ``layer(x)`` factorized and rebuilt, interleaved (the order
    alternating per repeat), synchronising the device around each call."""
    import time

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    weight = layer.to_dense() if folded else None

    def factorized() -> None:
        set_execution(layer, key, "factorized")
        layer(x)

    def rebuilt() -> None:
        if folded:
            rebuilt_forward(layer, x, weight)
        else:
            set_execution(layer, key, "rebuilt")
            with folding(False):  # (the rebuild in every call, as training and compile run it)
                layer(x)

    times: dict[str, list[float]] = {"f": [], "r": []}
    for k in range(warmup + repeats):
        pair = [("f", factorized), ("r", rebuilt)]
        for tag, fn in pair if k % 2 == 0 else pair[::-1]:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if k >= warmup:
                times[tag].append(time.perf_counter() - t0)
    return _median(times["f"]), _median(times["r"])


def _copy_strided(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with its strides (the layers plan by layout; ``clone`` keeps the
    strides of dense tensors only)."""
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return y.copy_(x.detach())


def _median(v: Sequence[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
