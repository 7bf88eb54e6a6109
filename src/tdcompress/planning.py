"""CompressionPlan: which layers are compressed, in which format, at which shapes and ranks.

The plan is the one record of a compression: ADMM, surgery, reports and checkpoints all
read it, and it round-trips through YAML/JSON.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdcompress.formats import FactorSpec, LayerGeometry, get_format

__all__ = ["LayerPlan", "CompressionPlan", "plan", "RATIO_TOLERANCE"]

#: a solved target must be met within this relative tolerance
RATIO_TOLERANCE = 0.03


@dataclass
class LayerPlan:
    """One planned layer.

    ``name`` is the module path; ``param`` the path of the weight parameter that ADMM
    constrains (``"<name>.weight"``, or ``"<lstm>.weight_ih_l<k>"`` for an LSTM's
    input-to-hidden matrix). ``input_hw`` (convs) and ``steps`` (how often the layer's
    product runs per sample: LSTM time steps, Linear positions, and the calls of a module
    that runs more than once) are recorded from an example forward pass and only used for
    MAC counts. ``transposed``: the parameter holds the weight as ``(in_features,
    out_features)`` (Hugging Face's ``Conv1D`` in GPT-2); ADMM and surgery read it through
    :meth:`dense_view`.
    """

    name: str
    param: str
    geometry: LayerGeometry
    spec: FactorSpec
    input_hw: tuple[int, int] | None = None
    steps: int = 1
    transposed: bool = False

    def dense_view(self, w: torch.Tensor) -> torch.Tensor:
        """The parameter ``w`` in the dense layer's weight layout (a view)."""
        return w.mT if self.transposed else w

    def param_view(self, w: torch.Tensor) -> torch.Tensor:
        """A weight in the dense layout back in the parameter's layout (a view)."""
        return w.mT if self.transposed else w

    @property
    def param_shape(self) -> tuple[int, ...]:
        shape = self.geometry.weight_shape
        return shape[::-1] if self.transposed else shape

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """The format's projection of the parameter ``w``, in the parameter's layout."""
        return self.param_view(self.format.project(self.dense_view(w), self.spec))

    @property
    def format(self):
        return get_format(self.spec.format)

    @property
    def dense_params(self) -> int:
        return self.geometry.dense_params

    @property
    def params(self) -> int:
        return self.format.num_params(self.geometry, self.spec)

    @property
    def dense_macs(self) -> int | None:
        if self.geometry.kind == "conv2d" and self.input_hw is None:
            return None
        return self.steps * self.geometry.dense_macs(self.input_hw)

    @property
    def macs(self) -> int | None:
        if self.geometry.kind == "conv2d" and self.input_hw is None:
            return None
        return self.steps * self.format.macs(self.geometry, self.spec, self.input_hw)

    def to_dict(self) -> dict[str, Any]:
        g = self.geometry
        geo = {"kind": g.kind, "out_features": g.out_features, "in_features": g.in_features}
        if g.kind == "conv2d":
            geo.update(
                kernel_size=list(g.kernel_size),
                stride=list(g.stride),
                padding=list(g.padding),
                dilation=list(g.dilation),
                groups=g.groups,
            )
        geo["bias"] = g.bias
        d = {"name": self.name, "param": self.param, "geometry": geo, **self.spec.to_dict()}
        if self.input_hw is not None:
            d["input_hw"] = list(self.input_hw)
        if self.steps != 1:
            d["steps"] = self.steps
        if self.transposed:
            d["transposed"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
        d = dict(d)
        geo = dict(d.pop("geometry"))
        for k in ("kernel_size", "stride", "padding", "dilation"):
            if k in geo:
                geo[k] = tuple(geo[k])
        hw = d.pop("input_hw", None)
        return cls(
            name=d.pop("name"),
            param=d.pop("param"),
            geometry=LayerGeometry(**geo),
            input_hw=tuple(hw) if hw is not None else None,
            steps=int(d.pop("steps", 1)),
            transposed=bool(d.pop("transposed", False)),
            spec=FactorSpec.from_dict(d),
        )


@dataclass
class CompressionPlan:
    """The planned layers of one model plus the model's dense totals (for whole-model ratios)."""

    layers: list[LayerPlan]
    model_params: int
    model_macs: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: weights that no format can take here, by name, with the reason (not compressed)
    skipped: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- totals
    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name or lp.param == name:
                return lp
        raise KeyError(f"no planned layer named {name!r}; planned: {[lp.name for lp in self]}")

    @property
    def compressed_params(self) -> int:
        """Parameters of the whole model after compression."""
        return self.model_params - sum(lp.dense_params - lp.params for lp in self.layers)

    @property
    def ratio(self) -> float:
        """Whole-model compression ratio: dense parameters / parameters after compression."""
        return self.model_params / self.compressed_params

    @property
    def layers_ratio(self) -> float:
        """Compression ratio of the planned layers only."""
        return sum(lp.dense_params for lp in self) / max(1, sum(lp.params for lp in self))

    @property
    def compressed_macs(self) -> int | None:
        if self.model_macs is None or any(lp.macs is None for lp in self):
            return None
        return self.model_macs - sum(lp.dense_macs - lp.macs for lp in self)  # type: ignore[operator]

    @property
    def macs_reduction(self) -> float | None:
        c = self.compressed_macs
        return None if c is None or self.model_macs is None else self.model_macs / max(1, c)

    # ---------------------------------------------------------------- report
    def summary(self) -> str:
        """A per-layer table (shape, format, ranks, params and MACs before/after) and totals."""

        def fmt_int(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        rows = [("layer", "shape", "format", "ranks", "params", "params TD", "MACs", "MACs TD")]
        over = self.over_dense_macs()
        for lp in self:
            s = lp.spec
            shape = "x".join(map(str, lp.geometry.weight_shape))
            if s.out_factors:
                outs = "x".join(map(str, s.out_factors))
                ins = "x".join(map(str, s.in_factors or ()))
                shape += f" ({outs} | {ins})"
            fmt = s.format + (f"/{s.layout}" if s.layout else "")
            rows.append(
                (
                    lp.name,
                    shape,
                    fmt,
                    ",".join(map(str, s.ranks)),
                    fmt_int(lp.dense_params),
                    fmt_int(lp.params),
                    fmt_int(lp.dense_macs),
                    fmt_int(lp.macs) + (" !" if lp.name in over else ""),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(
            f"whole model: {self.model_params:,} -> {self.compressed_params:,} params "
            f"({self.ratio:.2f}x)"
        )
        lines.append(f"planned layers only: {self.layers_ratio:.2f}x")
        if self.macs_reduction is not None:
            lines.append(
                f"MACs: {self.model_macs:,} -> {self.compressed_macs:,} "
                f"({self.macs_reduction:.2f}x fewer)"
            )
        if over:
            lines.append(
                "! more MACs than the dense layer: "
                + ", ".join(f"{n} ({x:.1f}x)" for n, x in over.items())
                + " (plan with max_layer_macs=1.0 to cap every layer at its dense MACs)"
            )
        if self.skipped:
            lines.append("not compressible here (left dense):")
            lines.extend(f"  {n}: {why}" for n, why in self.skipped.items())
        return "\n".join(lines)

    def over_dense_macs(self) -> dict[str, float]:
        """Planned layers whose factorized forward needs more MACs than the dense layer
        (at the traced input): name -> MACs / dense MACs."""
        return {
            lp.name: lp.macs / lp.dense_macs
            for lp in self
            if lp.macs is not None and lp.dense_macs and lp.macs > lp.dense_macs
        }

    # ---------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_params": self.model_params,
            "layers": [lp.to_dict() for lp in self.layers],
        }
        if self.model_macs is not None:
            d["model_macs"] = self.model_macs
        if self.meta:
            d["meta"] = self.meta
        if self.skipped:
            d["skipped"] = dict(self.skipped)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionPlan:
        allowed = {"model_params", "model_macs", "layers", "meta", "skipped"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(
                f"unknown plan keys {sorted(unknown)}; allowed keys are {sorted(allowed)}"
            )
        return cls(
            layers=[LayerPlan.from_dict(x) for x in d["layers"]],
            model_params=int(d["model_params"]),
            model_macs=d.get("model_macs"),
            meta={_OLD_META_KEYS.get(k, k): v for k, v in (d.get("meta") or {}).items()},
            skipped=dict(d.get("skipped") or {}),
        )

    def save(self, path: str | Path) -> None:
        """Write the plan as YAML (``.yaml``/``.yml``) or JSON (any other suffix), atomically."""
        import yaml

        path = Path(path)
        text = (
            yaml.safe_dump(self.to_dict(), sort_keys=False)
            if path.suffix in (".yaml", ".yml")
            else json.dumps(self.to_dict(), indent=2)
        )
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:  # synced before the rename: never an empty plan file
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        import yaml

        text = Path(path).read_text()
        try:
            d = yaml.safe_load(text)  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            from tdcompress.config import yaml_problem

            raise ValueError(
                f"plan file {path} is not valid YAML: {yaml_problem(e)}; restore it or plan "
                "again (`tdcompress plan CONFIG --force`)"
            ) from None
        if not isinstance(d, Mapping) or "layers" not in d:
            raise ValueError(f"plan file {path} holds no plan (a mapping with 'layers')")
        return cls.from_dict(d)

    def check_model(self, model: nn.Module) -> None:
        """Raise a clear error if ``model`` does not contain every planned weight."""
        params = dict(model.named_parameters())
        missing = [lp.param for lp in self if lp.param not in params]
        if missing:
            raise ValueError(
                f"the model does not contain the planned weights {missing}; "
                f"was it already decomposed, or is this the plan of another model?"
            )
        for lp in self:
            got = tuple(params[lp.param].shape)
            if got != lp.param_shape:
                raise ValueError(
                    f"{lp.param}: weight shape {got} differs from the planned {lp.param_shape}"
                )
            # a layer built from the plan must compute what the module does: same stride,
            # padding, dilation, groups and bias, not only the same weight shape
            mod = model.get_submodule(lp.param.rsplit(".", 1)[0])
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                geo = LayerGeometry.from_module(mod)
                diff = [
                    f"{f.name}={getattr(geo, f.name)!r} (planned {getattr(lp.geometry, f.name)!r})"
                    for f in fields(geo)
                    if getattr(geo, f.name) != getattr(lp.geometry, f.name)
                ]
                if diff:
                    raise ValueError(
                        f"{lp.name}: the model's layer differs from the plan's: {', '.join(diff)}; "
                        "plan this model again"
                    )


# -------------------------------------------------------------------- planning
def _is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    w = getattr(mod, "weight", None)
    nf, nx = getattr(mod, "nf", None), getattr(mod, "nx", None)
    return (
        type(mod).__name__ == "Conv1D"
        and isinstance(nf, int)
        and isinstance(nx, int)
        and isinstance(w, nn.Parameter)
        and tuple(w.shape) == (nx, nf)
    )


def _linear_like(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _own_forward(mod: nn.Module) -> str | None:
    """The name of the method by which a subclass of nn.Linear / nn.Conv2d computes
    something else than its base (timm's StdConv2d standardises its weight in ``forward``,
    Conv2dSame pads there), or None: a factorized layer in its place would compute the
    base's function, so such layers are left dense."""
    base = nn.Linear if isinstance(mod, nn.Linear) else nn.Conv2d
    if not isinstance(mod, (nn.Linear, nn.Conv2d)) or type(mod) is base:
        return None
    for meth in ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",):
        if getattr(type(mod), meth) is not getattr(base, meth):
            return meth
    return None


#: why nn.MultiheadAttention's projections stay dense
_MHA_IN_PROJ = (
    "the packed q/k/v projection of nn.MultiheadAttention: a bare parameter, no layer to swap"
)
_MHA_OUT_PROJ = (
    "nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: a "
    "factorized one would be rebuilt dense on every call"
)


def _candidates(
    model: nn.Module, lstm: bool
) -> tuple[list[tuple[str, str, nn.Module, LayerGeometry]], dict[str, str], list[str]]:
    """(name, param, module, geometry) for every layer a format can take, in module order
    (subclasses of nn.Linear/nn.Conv2d included); the weights that cannot be taken, with
    the reason; and the names of all Linear-like layers (taken or not), in module order."""
    out = []
    skipped: dict[str, str] = {}
    linears: list[str] = []
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    mha_out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            packed = [
                n
                for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if getattr(mod, n, None) is not None
            ]
            for n in packed:
                skipped[prefix + n] = _MHA_IN_PROJ
            mha_out.add(prefix + "out_proj")
    for name, mod in model.named_modules():
        if _linear_like(mod) or isinstance(mod, nn.Conv2d):
            if _linear_like(mod):
                linears.append(name)
            w = mod.weight
            own = f"{name}.weight" if name else "weight"
            shared = [n for n in owners.get(id(w), []) if n != own]
            if name in mha_out:
                skipped[name] = _MHA_OUT_PROJ
            elif _own_forward(mod):
                skipped[name] = (
                    f"{type(mod).__name__} overrides {_own_forward(mod)}() of "
                    f"{'nn.Linear' if isinstance(mod, nn.Linear) else 'nn.Conv2d'}: a factorized "
                    "layer in its place would not compute it"
                )
            elif isinstance(w, nn.parameter.UninitializedParameter):
                skipped[name] = "a lazy layer not yet initialised: run the model once first"
            elif shared:
                skipped[name] = (
                    f"its weight is shared with {', '.join(shared)} (tied weights): "
                    "factorizing one user would untie them"
                )
            elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
                skipped[name] = (
                    f"grouped convolution (groups={mod.groups}): the formats factor a full "
                    "kernel (groups=1)"
                )
            elif _is_conv1d(mod):
                geo = LayerGeometry.linear(mod.nx, mod.nf, bias=mod.bias is not None)
                out.append((name, f"{name}.weight", mod, geo))
            else:
                try:
                    geo = LayerGeometry.from_module(mod)
                except ValueError as e:  # string padding, other padding modes
                    skipped[name] = str(e)
                    continue
                out.append((name, f"{name}.weight", mod, geo))
        elif lstm and type(mod) is nn.LSTM:
            if mod.proj_size or mod.bidirectional:
                what = "proj_size" if mod.proj_size else "bidirectional"
                skipped[name] = f"an nn.LSTM with {what}: FactorizedLSTM does not support it"
                continue
            for k in range(mod.num_layers):
                w = getattr(mod, f"weight_ih_l{k}")
                geo = LayerGeometry.linear(w.shape[1], w.shape[0], bias=False)
                out.append((f"{name}.l{k}", f"{name}.weight_ih_l{k}", mod, geo))
    return out, skipped, linears


def _default_selection(cands: list, linears: Sequence[str] = ()) -> list:
    """The paper's default: convs larger than 1x1 and Linears, minus the first conv and the
    last Linear (the classifier, even when it is not compressible, e.g. tied to an
    embedding); LSTM input matrices are kept when asked for."""
    convs = [c for c in cands if c[3].kind == "conv2d" and isinstance(c[2], nn.Conv2d)]
    lins = [c[0] for c in cands if _linear_like(c[2])]
    drop = set()
    if convs:
        drop.add(convs[0][0])
    last = list(linears)[-1:] or lins[-1:]
    drop.update(last)
    keep = []
    for c in cands:
        if c[0] in drop:
            continue
        g = c[3]
        if g.kind == "conv2d" and (g.kernel_size == (1, 1) or g.groups != 1):
            continue
        keep.append(c)
    return keep


def _example(
    model: nn.Module, input_shape: Sequence[int] | None, example_inputs: Any
) -> tuple[tuple, dict] | None:
    """(args, kwargs) of the example forward pass, or None without one."""
    if example_inputs is not None:
        if input_shape is not None:
            raise ValueError(
                f"give input_shape or example_inputs, not both (got input_shape="
                f"{tuple(input_shape)!r} and example_inputs of type "
                f"{type(example_inputs).__name__})"
            )
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,), {}
        if isinstance(example_inputs, tuple):
            return example_inputs, {}
        if isinstance(example_inputs, Mapping):
            return (), dict(example_inputs)
        raise TypeError(
            "example_inputs must be a tensor, a tuple of positional inputs or a dict of "
            f"keyword inputs, got {type(example_inputs).__name__}"
        )
    if input_shape is None:
        return None
    p = next(model.parameters(), None)
    x = torch.zeros(
        *input_shape,
        device=p.device if p is not None else None,
        dtype=p.dtype if p is not None and p.is_floating_point() else None,
    )
    return (x,), {}


def _trace_shapes(
    model: nn.Module, input_shape: Sequence[int] | None, example_inputs: Any = None
) -> dict[str, Any]:
    """Input sizes of every Conv2d (hw, and how often it ran) and LSTM (time steps) and the
    rows of every Linear (all positions of the example; nn.Linear subclasses and Hugging
    Face's Conv1D too) from one example forward pass, summed over the calls of a module that
    runs more than once; and the dense MACs of all Conv2d/Linear/LSTM calls (both directions
    of a bidirectional LSTM) and of nn.MultiheadAttention's projections. Convs count per
    sample; Linears every row of the example, so give a batch of one."""
    example = _example(model, input_shape, example_inputs)
    if example is None:
        return {}
    seen: dict[str, Any] = {}
    macs = [0]
    hooks = []

    def hook(name: str) -> Callable:
        def f(mod: nn.Module, args: tuple, out: Any) -> None:
            x, prev = args[0], seen.get(name)
            if isinstance(mod, nn.Conv2d):
                hw = tuple(x.shape[-2:])
                macs[0] += LayerGeometry.from_module(mod).dense_macs(hw)
                # (a shared conv's later calls are counted at its first call's size)
                calls = prev[3] + 1 if prev else 1
                seen[name] = ("conv", prev[1] if prev else hw, tuple(out.shape[-2:]), calls)
            elif isinstance(mod, nn.LSTM):
                t = int(x.shape[1] if mod.batch_first else x.shape[0])
                h, dirs = mod.hidden_size, 2 if mod.bidirectional else 1
                for k in range(mod.num_layers):
                    i = mod.input_size if k == 0 else h * dirs
                    macs[0] += dirs * t * 4 * h * (i + h)
                seen[name] = ("lstm", (prev[1] if prev else 0) + t)
            elif _linear_like(mod):
                n = int(math.prod(x.shape[:-1])) if x.dim() > 1 else 1
                macs[0] += n * int(mod.weight.numel())
                seen[name] = ("linear", (prev[1] if prev else 0) + n)

        return f

    def attention(mod: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> None:
        # the projections run inside F.multi_head_attention_forward, not as module calls
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        rows = [int(t.numel() // t.shape[-1]) for t in (q, k, v)]
        e = mod.embed_dim
        macs[0] += rows[0] * e * e + rows[1] * e * mod.kdim + rows[2] * e * mod.vdim
        macs[0] += rows[0] * e * e  # out_proj

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.LSTM)) or _linear_like(mod):
            hooks.append(mod.register_forward_hook(hook(name)))
        elif isinstance(mod, nn.MultiheadAttention):
            hooks.append(mod.register_forward_hook(attention, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example[0], **example[1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    seen["__macs__"] = macs[0]
    return seen


#: the key of a plan's ``meta`` that records a solved target: the name of plan()'s argument
_TARGET_META = {"ratio": "target_ratio", "MAC reduction": "target_macs_reduction"}
#: ``meta`` keys of older plan files, read under their current names
_OLD_META_KEYS = {"target_mac_reduction": "target_macs_reduction"}

#: how a solved target is shared among layers (see :func:`plan`)
ALLOCATIONS = ("equal_rank", "equal_ratio")


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


#: plan()'s arguments that the compress section of a config (``CompressConfig``) sets, with
#: their defaults
_CONFIG_ARGS: dict[str, Any] = {
    "format": None,
    "ranks": None,
    "target_ratio": None,
    "target_macs_reduction": None,
    "include": None,
    "exclude": (),
    "lstm": False,
    "layout": None,
    "allocation": "equal_rank",
    "overrides": None,
}


def _config_args(config: Any) -> dict[str, Any]:
    """plan()'s arguments from the compress section of a config: a ``CompressConfig`` or its
    dict (missing keys take the ``CompressConfig`` defaults; ``init`` is decompose()'s)."""
    from tdcompress.config import CompressConfig

    if isinstance(config, Mapping):
        allowed = {f.name for f in fields(CompressConfig)}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(
                f"unknown compress config keys {unknown}; allowed keys are {sorted(allowed)}"
            )
        config = CompressConfig(**config)
    if not isinstance(config, CompressConfig):
        raise TypeError(
            f"config must be a CompressConfig or a mapping of its fields, got "
            f"{type(config).__name__}"
        )
    args = {k: getattr(config, k) for k in _CONFIG_ARGS}
    args["overrides"] = args["overrides"] or None
    return args


def plan(
    model: nn.Module,
    format: str | None = None,
    *,
    config: Any = None,
    ranks: int | Sequence[int] | Mapping[str, int | Sequence[int]] | None = None,
    target_ratio: float | None = None,
    target_macs_reduction: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    lstm: bool = False,
    layout: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    input_shape: Sequence[int] | None = None,
    allocation: str = "equal_rank",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    example_inputs: Any = None,
    max_layer_macs: float | None = None,
) -> CompressionPlan:
    """Plan the compression of ``model`` in ``format`` (default ``"tt"``).

    ``config``: the compress section of a config (a :class:`~tdcompress.config.CompressConfig`
    or its dict, as ``cfg.compress`` of :func:`~tdcompress.config.load_config`) instead of
    the arguments it sets (``format``, ``ranks``, the targets, ``include``, ``exclude``,
    ``lstm``, ``layout``, ``allocation``, ``overrides``), which must then be left out; the
    others (``input_shape``, ``example_inputs``, ``filter_fn``, ``max_layer_macs``) still
    apply. The pipeline plans this way.

    Selection: with ``include=None`` the paper's default (every Conv2d larger than 1x1 and
    every Linear except the first conv and the last Linear; LSTM input-to-hidden matrices,
    named ``"<lstm>.l<k>"``, if ``lstm=True``); otherwise the Conv2d/Linear (and LSTM) layers
    whose names match a glob in ``include``. ``exclude`` globs remove layers either way.
    Every ``include`` pattern must match at least one layer. Subclasses of nn.Linear and
    nn.Conv2d count, and so does Hugging Face's ``Conv1D`` (GPT-2; a Linear stored
    transposed). Weights that no format can take are left dense and listed with the reason
    in ``CompressionPlan.skipped`` (and the summary): grouped convolutions, weights tied to
    another module's, nn.MultiheadAttention's packed input projection (a bare parameter)
    and its ``out_proj`` (read as a bare weight by the attention, never called).

    Ranks: exactly one of ``ranks`` (an int for every bond of every layer, a per-bond list
    for every layer, or a mapping from layer-name glob to either), ``target_ratio``
    (whole-model parameter ratio, dense / compressed) or ``target_macs_reduction`` (needs
    ``input_shape``). Solved targets use equal ranks inside a layer and must be met within
    3% (near the allocation's start first, then any combination of far ranks), else a
    ValueError names the closest value found. ``allocation`` says how a
    target is shared among layers: ``"equal_rank"`` (the paper's: about the same rank in
    every layer, so narrow layers keep most of their size and wide ones lose most) or
    ``"equal_ratio"`` (every layer shrunk by about the same factor in parameters, or in
    MACs for a MAC target; as nearly as whole ranks allow within the 3%: small layers
    have coarse rank steps).

    ``filter_fn(module, name) -> bool`` (as torchao's ``quantize_``), if given, keeps only
    the layers so selected that it accepts (an LSTM's matrices: the ``nn.LSTM`` and
    ``"<lstm>.l<k>"``); with ``include=["*"]`` it alone decides.

    ``overrides`` maps a layer name to spec fields (``format``, ``ranks``, ``out_factors``,
    ``in_factors``, ``layout``). ``input_shape`` (e.g. ``(1, 3, 32, 32)``; a float tensor of
    zeros) or ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs, e.g. ``{"input_ids": ids}``; give a batch of one) enables MAC counts: those of
    one forward pass on that input.

    ``max_layer_macs``: a ceiling on each planned layer's MACs, as a multiple of its dense
    layer's (1.0: no layer may cost more than the dense one; at small batches a TT layer at
    a high rank can cost several times as much). A layer above it gets the largest cap on
    its ranks that meets it (recorded in ``meta["macs_capped"]``); needs MAC counts.
    """
    if config is not None:
        given = dict(
            format=format,
            ranks=ranks,
            target_ratio=target_ratio,
            target_macs_reduction=target_macs_reduction,
            include=include,
            exclude=exclude,
            lstm=lstm,
            layout=layout,
            allocation=allocation,
            overrides=overrides,
        )
        clash = [
            k
            for k, v in given.items()
            if not (
                v is _CONFIG_ARGS[k]
                or (k in ("exclude", "overrides") and not v)
                or v == _CONFIG_ARGS[k]
            )
        ]
        if clash:
            raise ValueError(
                f"give {clash} either in config or as arguments, not both (config sets "
                f"{list(_CONFIG_ARGS)})"
            )
        return plan(
            model,
            **_config_args(config),
            input_shape=input_shape,
            filter_fn=filter_fn,
            example_inputs=example_inputs,
            max_layer_macs=max_layer_macs,
        )
    if format is None:
        format = "tt"
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    get_format(format)  # validates the name
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if ranks is not None and allocation != "equal_rank":
        raise ValueError(
            f"allocation={allocation!r} shares a target_ratio or target_macs_reduction among "
            "layers; with explicit ranks leave it at 'equal_rank'"
        )
    given = [v is not None for v in (ranks, target_ratio, target_macs_reduction)]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of ranks, target_ratio or target_macs_reduction "
            f"(got ranks={ranks!r}, target_ratio={target_ratio!r}, "
            f"target_macs_reduction={target_macs_reduction!r})"
        )
    if max_layer_macs is not None and not (
        isinstance(max_layer_macs, (int, float))
        and math.isfinite(max_layer_macs)
        and max_layer_macs > 0
    ):
        raise ValueError(
            f"max_layer_macs must be a finite number > 0 (a multiple of each layer's dense "
            f"MACs, e.g. 1.0), got {max_layer_macs!r}"
        )
    overrides = dict(overrides or {})
    cands, skipped, linears = _candidates(
        model, lstm or bool(include and any(".l" in p for p in include))
    )
    names = [c[0] for c in cands]
    if include is None:
        chosen = _default_selection(cands, linears)
        if not lstm:
            chosen = [c for c in chosen if type(c[2]) is not nn.LSTM]
    else:
        if isinstance(include, str):
            include = [include]
        for p in include:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                hit = {n: why for n, why in skipped.items() if fnmatch.fnmatchcase(n, p)}
                if hit:
                    raise ValueError(
                        f"include pattern {p!r} matches only weights that cannot be "
                        "compressed: " + "; ".join(f"{n}: {why}" for n, why in hit.items())
                    )
                raise ValueError(
                    f"include pattern {p!r} matches no Conv2d/Linear/LSTM layer; layers are {names}"
                )
        chosen = [c for c in cands if _match(c[0], include)]
    if isinstance(exclude, str):
        exclude = [exclude]
    chosen = [c for c in chosen if not _match(c[0], exclude)]
    if filter_fn is not None:
        if not callable(filter_fn):
            raise TypeError(
                f"filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}"
            )
        chosen = [c for c in chosen if filter_fn(c[2], c[0])]
    for n in overrides:
        if n not in {c[0] for c in chosen}:
            raise ValueError(
                f"overrides name {n!r}, which is not a planned layer; "
                f"planned: {[c[0] for c in chosen]}"
            )
    if not chosen:
        why = "".join(f"; {n} is not compressible: {r}" for n, r in skipped.items())
        raise ValueError(f"no layer selected for compression; layers are {names}{why}")
    if any(c[0] == "" or c[0].startswith(".") for c in chosen):
        raise ValueError(
            f"the model is itself a {type(model).__name__}: layers are replaced inside a "
            "parent module, so wrap it (e.g. nn.Sequential(model)) and plan that"
        )

    shapes = _trace_shapes(model, input_shape, example_inputs)
    model_params = sum(p.numel() for p in model.parameters())
    model_macs = shapes.get("__macs__")
    capped: dict[str, list[int]] = {}

    def make(rank_for: Callable[[str], Any]) -> CompressionPlan:
        layers = []
        for name, param, mod, geo in chosen:
            ov = dict(overrides.get(name, {}))
            fmt = get_format(ov.pop("format", format))
            r = ov.pop("ranks", None) or rank_for(name)
            spec = fmt.resolve(
                geo,
                r,
                out_factors=_tuple(ov.pop("out_factors", None)),
                in_factors=_tuple(ov.pop("in_factors", None)),
                layout=ov.pop("layout", layout),
                layer_name=name,
            )
            if ov:
                raise ValueError(f"overrides[{name!r}] has unknown keys {sorted(ov)}")
            hw, steps = None, 1
            info = shapes.get(name.rsplit(".l", 1)[0] if type(mod) is nn.LSTM else name)
            if info and info[0] == "conv":
                hw, steps = info[1], info[3]
            elif info and info[0] in ("lstm", "linear"):
                steps = info[1]
            lp = LayerPlan(name, param, geo, spec, hw, steps, transposed=_is_conv1d(mod))
            if max_layer_macs is not None:
                lp = _cap_macs(lp, float(max_layer_macs), capped)
            layers.append(lp)
        return CompressionPlan(layers, model_params, model_macs, skipped=dict(skipped))

    def finish(p: CompressionPlan) -> CompressionPlan:
        if max_layer_macs is not None:
            p.meta["max_layer_macs"] = float(max_layer_macs)
            kept = {lp.name: list(lp.spec.ranks) for lp in p}
            hits = {n: r for n, r in capped.items() if n in kept and r == kept[n]}
            if hits:
                p.meta["macs_capped"] = hits
        return p

    if ranks is not None:
        if isinstance(ranks, Mapping):
            rmap = dict(ranks)

            def rank_for(name: str) -> Any:
                for pat, r in rmap.items():
                    if fnmatch.fnmatchcase(name, pat):
                        return r
                raise ValueError(
                    f"ranks has no entry matching layer {name!r}; patterns: {list(rmap)}"
                )

            return finish(make(rank_for))
        return finish(make(lambda name: ranks))

    if target_ratio is not None:
        return finish(
            _capped_solve(
                max_layer_macs,
                make,
                chosen,
                float(target_ratio),
                "ratio",
                lambda p: p.ratio,
                allocation,
                lambda lp: (lp.params, lp.dense_params),
            )
        )
    if input_shape is None and example_inputs is None:
        raise ValueError("target_macs_reduction needs input_shape or example_inputs to count MACs")
    unseen = [lp.name for lp in make(lambda name: 1) if lp.macs is None]
    if unseen:
        raise ValueError(
            f"target_macs_reduction needs the MACs of every planned layer, but {unseen} saw "
            f"no input when the model ran on "
            f"{'example_inputs' if input_shape is None else f'input_shape {tuple(input_shape)}'}"
            "; exclude them "
            "or give target_ratio"
        )
    return finish(
        _capped_solve(
            max_layer_macs,
            make,
            chosen,
            float(target_macs_reduction),
            "MAC reduction",
            lambda p: p.macs_reduction,
            allocation,
            lambda lp: (lp.macs, lp.dense_macs),
        )
    )


def _capped_solve(max_layer_macs: float | None, *args: Any) -> CompressionPlan:
    """:func:`_solve`, whose error names the MAC ceiling when there is one."""
    try:
        return _solve(*args)
    except ValueError as e:
        if max_layer_macs is None:
            raise
        raise ValueError(
            f"{e} (with max_layer_macs={max_layer_macs:g}, which caps the ranks of layers "
            "that would need more MACs)"
        ) from None


def _cap_macs(lp: LayerPlan, ceiling: float, capped: dict[str, list[int]]) -> LayerPlan:
    """``lp`` with its ranks capped at the largest value whose MACs are at most ``ceiling``
    times the dense layer's (``lp`` itself if it already is); records the capped ranks."""
    if lp.macs is None or lp.dense_macs is None:
        raise ValueError(
            f"max_layer_macs needs the MACs of every planned layer, but {lp.name!r} saw no "
            "input: give input_shape or example_inputs that run it"
        )
    limit = ceiling * lp.dense_macs
    if lp.macs <= limit:
        return lp
    fmt, s = lp.format, lp.spec

    def at(cap: int) -> LayerPlan:
        ranks = tuple(min(r, cap) for r in s.ranks)
        spec = fmt.resolve(
            lp.geometry,
            ranks,
            out_factors=s.out_factors,
            in_factors=s.in_factors,
            layout=s.layout,
            layer_name=lp.name,
        )
        return LayerPlan(lp.name, lp.param, lp.geometry, spec, lp.input_hw, lp.steps, lp.transposed)

    lo, hi = 1, max(s.ranks)  # at(hi) is lp: over the limit
    if at(lo).macs > limit:  # type: ignore[operator]
        raise ValueError(
            f"{lp.name}: even at rank 1 the {s.format!r} layer needs {at(lo).macs:,} MACs, "
            f"more than max_layer_macs={ceiling:g} x its dense {lp.dense_macs:,}; exclude it "
            "or raise max_layer_macs"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).macs <= limit:  # type: ignore[operator]
            lo = mid
        else:
            hi = mid
    out = at(lo)
    capped[lp.name] = list(out.spec.ranks)
    return out


def _equal_rank_start(
    at: Callable[[tuple[int, ...]], CompressionPlan],
    n: int,
    target: float,
    measure: Callable[[CompressionPlan], float],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The largest equal rank r whose plan still meets the target (the measure decreases
    as ranks grow), and r + 1."""
    lo, hi = 1, 1
    while measure(at((hi,) * n)) >= target:
        lo, hi = hi, hi * 2
        if hi > 1 << 16:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(at((mid,) * n)) >= target:
            lo = mid
        else:
            hi = mid
    return (lo,) * n, (lo + 1,) * n


def _equal_ratio_start(
    at: Callable[[tuple[int, ...]], CompressionPlan],
    n: int,
    target: float,
    measure: Callable[[CompressionPlan], float],
    layer_size: Callable[[LayerPlan], tuple[float, float]],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ranks that keep every layer at about the same fraction f of its dense size: for each
    layer the largest rank whose size is at most f times the dense one (at least 1), with f
    the largest fraction whose plan still meets the target; and the ranks one step of f
    above it."""
    # each layer's size at equal ranks 1, 2, ... until no layer's ranks change any more
    # (every rank clipped at its feasible bound); geometric steps above 32 keep wide layers
    # cheap to tabulate
    table: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    dense = [0.0] * n
    r, prev = 1, None
    while r <= 1 << 16:
        p = at((r,) * n)
        specs = [lp.spec.ranks for lp in p.layers]
        if specs == prev:
            break
        for i, lp in enumerate(p.layers):
            size, dense[i] = layer_size(lp)
            table[i].append((r, size))
        prev = specs
        r = r + 1 if r < 32 else max(r + 1, round(r * 1.05))

    def ranks(f: float) -> tuple[int, ...]:
        return tuple(
            max([r for r, size in table[i] if size <= f * dense[i]], default=1) for i in range(n)
        )

    lo, hi = 0.0, 1.0  # f = 0: every rank 1 (the most any plan can compress)
    for _ in range(50):
        mid = (lo + hi) / 2
        if measure(at(ranks(mid))) >= target:
            lo = mid
        else:
            hi = mid
    return ranks(lo), ranks(hi)


def _additive_search(
    at: Callable[[tuple[int, ...]], CompressionPlan],
    start: tuple[int, ...],
    target: float,
    measure: Callable[[CompressionPlan], float],
    layer_size: Callable[[LayerPlan], tuple[float, float]],
    windows: Sequence[Iterable[int]] | None = None,
    equal_fraction: bool = False,
) -> CompressionPlan | None:
    """Per-layer ranks whose plan meets ``target`` within tolerance, or None: the ranks tried
    are ``windows[i]`` (default: near ``start`` or 1 or a power of two), and the one kept
    is the closest to ``start`` (sum of |log rank ratios|) or, with ``equal_fraction``, the
    one whose layers are closest to one shared fraction f of their dense sizes (sum of
    |log(size / (f dense))|, f the fraction that meets the target exactly).

    The measure is D / (F + S): S the sum of the planned layers' sizes, F the size of the
    rest; D and F follow from the start plan. A dynamic programme over the layers keeps,
    per bucket of S (1/(4 L) of the allowed interval), the best assignment."""
    base = at(start)
    n = len(start)
    sizes = [layer_size(lp) for lp in base.layers]
    s0, dense = sum(s for s, _ in sizes), sum(d for _, d in sizes)
    m = measure(base)
    if not (math.isfinite(m) and m > 1):
        return None
    D = m * (dense - s0) / (m - 1)
    F = D - dense
    lo = D / (target * (1 + RATIO_TOLERANCE)) - F
    hi = D / (target * (1 - RATIO_TOLERANCE)) - F
    if hi <= 0:
        return None
    far = {1 << k for k in range(17)}
    if windows is None:
        windows = [set(range(max(1, r0 - 3), r0 + 5)) | far for r0 in start]
    # the fraction f that meets the target exactly (> 0: the band may start at S = 0)
    share = max((D / target - F) / dense, 1e-12)
    options: list[list[tuple[int, float]]] = []
    for i, window in enumerate(windows):
        seen: dict[tuple[int, ...], tuple[int, float]] = {}
        for r in sorted(set(window)):
            lp = at(tuple(r if j == i else q for j, q in enumerate(start))).layers[i]
            seen.setdefault(tuple(lp.spec.ranks), (r, layer_size(lp)[0]))  # (clipped: once)
        options.append(list(seen.values()))

    def cost(i: int, r: int, size: float) -> float:
        if equal_fraction:
            return abs(math.log(max(size, 1e-12) / (share * sizes[i][1])))
        return abs(math.log(r / start[i]))

    step = (hi - lo) / (4 * n)
    states: dict[int, tuple[float, float, tuple[int, ...]]] = {0: (0.0, 0.0, ())}
    for i, opts in enumerate(options):
        nxt: dict[int, tuple[float, float, tuple[int, ...]]] = {}
        for dev, total, chosen in states.values():
            for r, size in opts:
                t = total + size
                if t > hi:
                    continue
                d = dev + cost(i, r, size)
                b = round(t / step)
                if b not in nxt or d < nxt[b][0]:
                    nxt[b] = (d, t, (*chosen, r))
        states = nxt
    fits = [v for v in states.values() if lo <= v[1] <= hi]
    return at(min(fits)[2]) if fits else None


def _tuple(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(a) for a in v)


def _solve(
    make: Callable[[Callable[[str], Any]], CompressionPlan],
    chosen: list,
    target: float,
    what: str,
    measure: Callable[[CompressionPlan], float],
    allocation: str = "equal_rank",
    layer_size: Callable[[LayerPlan], tuple[float, float]] | None = None,
) -> CompressionPlan:
    """A starting point from ``allocation`` (equal ranks as large as the target allows, or
    every layer at about the same fraction of its ``layer_size`` (compressed, dense)); then
    per-layer ranks within a few steps of it (still equal inside each layer), chosen one
    layer at a time to land close to the target (equal_rank: as close as possible;
    equal_ratio: only as far as needed to come within tolerance)."""
    if not math.isfinite(target) or target <= 1.0:
        raise ValueError(f"target {what} must be a finite number > 1, got {target}")
    names = [c[0] for c in chosen]
    memo: dict[tuple[int, ...], CompressionPlan] = {}

    def at(ranks: tuple[int, ...]) -> CompressionPlan:
        if ranks not in memo:
            rm = dict(zip(names, ranks))
            memo[ranks] = make(lambda n: rm[n])
        return memo[ranks]

    lo_plan = at((1,) * len(names))
    best_reach = measure(lo_plan)
    if best_reach < target * (1 - RATIO_TOLERANCE):
        raise ValueError(
            f"target {what} {target:g} is unreachable: the highest reachable value with these "
            f"layers and formats is {best_reach:.3g} (every rank 1)"
        )
    if allocation == "equal_ratio":
        assert layer_size is not None
        floor, ceil = _equal_ratio_start(at, len(names), target, measure, layer_size)
    else:
        floor, ceil = _equal_rank_start(at, len(names), target, measure)

    def miss(p: CompressionPlan) -> float:
        return abs(measure(p) / target - 1)

    def descend(ranks: list[int], windows: list[range], stop: float) -> CompressionPlan:
        """Per-layer ranks near ``ranks``, one layer at a time (coordinate descent), until
        the target is missed by at most ``stop`` or no single change gets closer."""
        best = at(tuple(ranks))
        while miss(best) > stop:
            trial = None
            for i in range(len(names)):
                for r in windows[i]:
                    if r == ranks[i]:
                        continue
                    r2 = list(ranks)
                    r2[i] = r
                    p = at(tuple(r2))
                    if miss(p) < miss(best) and (trial is None or miss(p) < miss(trial[1])):
                        trial = (r2, p)
            if trial is None:
                break
            ranks, best = trial
        return best

    if allocation == "equal_ratio":
        # keep the shared fraction: a start already within tolerance is taken as it is
        # (rank steps of small layers are large relative changes); else descend from both
        # starts only until within tolerance
        windows = [range(max(1, min(f, c) - 3), max(f, c) + 5) for f, c in zip(floor, ceil)]
        starts = sorted((floor, ceil), key=lambda r: miss(at(r)))
        if miss(at(starts[0])) <= RATIO_TOLERANCE:
            best = at(starts[0])
        else:
            # the combination of nearby ranks that stays closest to one shared fraction
            # (one-layer moves towards the target can leave a small layer far off it)
            found = _additive_search(
                at, floor, target, measure, layer_size, windows=windows, equal_fraction=True
            )
            if found is not None:
                best = found
            else:
                tries = [descend(list(r), windows, RATIO_TOLERANCE) for r in starts]
                best = min(tries, key=miss)
    else:
        # equal ranks: from the better of r and r + 1, as close to the target as one-layer
        # changes get
        start = min((floor, ceil), key=lambda r: miss(at(r)))
        best = descend(list(start), [range(max(1, r - 3), r + 5) for r in floor], 0.002)
    if miss(best) > RATIO_TOLERANCE and layer_size is not None:
        # small or uneven models: the target may need ranks far from the start (a layer at
        # rank 1, another near full rank), which one-layer moves do not find; search the
        # combinations (only when the near search failed: it costs more plans)
        start = next(r for r, p in memo.items() if p is best)
        found = _additive_search(at, start, target, measure, layer_size)
        if found is not None and miss(found) < miss(best):
            best = found
    got = measure(best)
    if abs(got / target - 1) > RATIO_TOLERANCE:
        raise ValueError(
            f"target {what} {target:g} cannot be met within {RATIO_TOLERANCE:.0%}: the closest "
            f"value found is {got:.3g}"
        )
    best.meta = {_TARGET_META[what]: target, "allocation": allocation}
    return best
