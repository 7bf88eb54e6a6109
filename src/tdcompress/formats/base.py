"""The contract every factorization format fulfils, and the registry of formats.

A *format* is the single owner of how the weight of a Linear or Conv2d layer maps to a
tensor and back. The same object gives the projection used by ADMM, the decomposition
into factors and exact parameter and MAC counts; the factorized module built from those
factors is the layer that registers for the format (:mod:`tdcompress.layers.registry`; the
formats import nothing of the layers), so projection and decomposition cannot disagree:
``fmt.project(W, spec) == layers.build(fmt, geom, fmt.decompose(W, spec), spec).to_dense()``.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

__all__ = [
    "LayerGeometry",
    "FactorSpec",
    "Format",
    "register_format",
    "get_format",
    "available_formats",
    "parse_layer_ranks",
]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(v: int | tuple[int, ...], name: str) -> tuple[int, int]:
    """``v`` as a pair of ints; floats, strings and bools are refused, not truncated."""
    items = (v, v) if _is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else None
    if items is None or len(items) != 2 or not all(_is_int(a) for a in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(items[0]), int(items[1]))


@dataclass(frozen=True)
class LayerGeometry:
    """What a format needs to know about a dense layer: its kind and its dimensions.

    For ``kind="linear"`` the weight is ``(out_features, in_features)``; for
    ``kind="conv2d"`` it is ``(out_features, in_features // groups, kh, kw)`` where
    ``out_features``/``in_features`` are the output/input channels.
    """

    kind: Literal["linear", "conv2d"]
    out_features: int
    in_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv2d"):
            raise ValueError(f"kind must be 'linear' or 'conv2d', got {self.kind!r}")
        for nm in ("out_features", "in_features", "groups"):
            v = getattr(self, nm)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        for nm in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, nm, _pair(getattr(self, nm), nm))
            low = 0 if nm == "padding" else 1
            if min(getattr(self, nm)) < low:
                raise ValueError(f"{nm} must be ints >= {low}, got {getattr(self, nm)}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be a bool, got {self.bias!r}")

    @classmethod
    def linear(cls, in_features: int, out_features: int, bias: bool = True) -> LayerGeometry:
        return cls("linear", out_features, in_features, bias=bias)

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerGeometry:
        """Geometry of an ``nn.Linear`` or ``nn.Conv2d`` (any other type raises TypeError)."""
        if isinstance(module, nn.Linear):
            return cls.linear(module.in_features, module.out_features, module.bias is not None)
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                raise ValueError(
                    f"Conv2d padding={module.padding!r} is not supported; use explicit ints"
                )
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"Conv2d padding_mode={module.padding_mode!r} is not supported; only 'zeros' is"
                )
            return cls(
                "conv2d",
                module.out_channels,
                module.in_channels,
                kernel_size=tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=tuple(module.padding),
                dilation=tuple(module.dilation),
                groups=module.groups,
                bias=module.bias is not None,
            )
        raise TypeError(
            f"only nn.Linear and nn.Conv2d layers can be factorized, got {type(module).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (pairs as lists); :meth:`from_dict` reads them back."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "out_features": self.out_features,
            "in_features": self.in_features,
        }
        if self.kind == "conv2d":
            for nm in ("kernel_size", "stride", "padding", "dilation"):
                d[nm] = list(getattr(self, nm))
            d["groups"] = self.groups
        d["bias"] = self.bias
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerGeometry:
        """The geometry written by :meth:`to_dict`; unknown keys raise ValueError."""
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(
                f"unknown LayerGeometry keys {sorted(unknown)}; allowed keys are {sorted(allowed)}"
            )
        kw = dict(d)
        for nm in ("kernel_size", "stride", "padding", "dilation"):
            if nm in kw and isinstance(kw[nm], list):
                kw[nm] = tuple(kw[nm])
        return cls(**kw)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layer, bias included."""
        n = 1
        for s in self.weight_shape:
            n *= s
        return n + (self.out_features if self.bias else 0)

    def output_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size of a conv for a given input size (identity for linear)."""
        if self.kind == "linear":
            return (1, 1)
        out = []
        for i in range(2):
            k = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            out.append((input_hw[i] + 2 * self.padding[i] - k) // self.stride[i] + 1)
        return (out[0], out[1])

    def dense_macs(self, input_hw: tuple[int, int] | None = None) -> int:
        """Multiply-accumulates of the dense layer for one sample (bias not counted)."""
        if self.kind == "linear":
            return self.out_features * self.in_features
        if input_hw is None:
            raise ValueError("input_hw is required to count the MACs of a conv2d layer")
        ho, wo = self.output_hw(input_hw)
        kh, kw = self.kernel_size
        return ho * wo * self.out_features * (self.in_features // self.groups) * kh * kw


@dataclass(frozen=True)
class FactorSpec:
    """How one layer is factorized: the format, its tensor shape and its ranks.

    ``ranks`` are the per-bond ranks after :meth:`Format.resolve` (what each bond means is
    the format's business and is documented there). ``out_factors``/``in_factors`` split
    the output/input dimension for the formats that tensorize it (TT, TR); ``layout``
    names a format variant (e.g. ``"channel"`` or ``"garipov"`` for TT convolutions).
    """

    format: str
    ranks: tuple[int, ...]
    out_factors: tuple[int, ...] | None = None
    in_factors: tuple[int, ...] | None = None
    layout: str | None = None
    options: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ranks", "out_factors", "in_factors"):
            if d[k] is not None:
                d[k] = list(d[k])
        if not d["options"]:
            d.pop("options")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FactorSpec:
        allowed = {"format", "ranks", "out_factors", "in_factors", "layout", "options"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(
                f"unknown FactorSpec keys {sorted(unknown)}; allowed keys are {sorted(allowed)}"
            )

        def tup(v: Any) -> tuple[int, ...] | None:
            return None if v is None else tuple(int(a) for a in v)

        return cls(
            format=str(d["format"]),
            ranks=tup(d["ranks"]) or (),
            out_factors=tup(d.get("out_factors")),
            in_factors=tup(d.get("in_factors")),
            layout=d.get("layout"),
            options=dict(d.get("options") or {}),
        )


class Format(ABC):
    """A factorization format for Linear and Conv2d weights (see module docstring)."""

    name: ClassVar[str]
    #: layer kinds this format supports
    kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")

    @abstractmethod
    def resolve(
        self,
        geometry: LayerGeometry,
        ranks: int | tuple[int, ...] | list[int],
        *,
        out_factors: tuple[int, ...] | None = None,
        in_factors: tuple[int, ...] | None = None,
        layout: str | None = None,
        layer_name: str = "layer",
    ) -> FactorSpec:
        """A complete, validated spec: automatic balanced shapes where none are given,
        ranks expanded to one per bond and clipped to the feasible bound. Errors name
        ``layer_name``, the offending value and what is allowed."""

    @abstractmethod
    def max_ranks(self, geometry: LayerGeometry, spec: FactorSpec) -> tuple[int, ...]:
        """The largest useful rank of every bond for this geometry and tensor shape."""

    @abstractmethod
    def project(self, weight: torch.Tensor, spec: FactorSpec) -> torch.Tensor:
        """The nearest (quasi-optimal) weight of the spec's rank: same shape as ``weight``."""

    @abstractmethod
    def decompose(self, weight: torch.Tensor, spec: FactorSpec) -> list[torch.Tensor]:
        """The factors of ``weight`` at the spec's rank."""

    @abstractmethod
    def num_params(self, geometry: LayerGeometry, spec: FactorSpec) -> int:
        """Parameters of the factorized layer, bias included."""

    @abstractmethod
    def macs(
        self, geometry: LayerGeometry, spec: FactorSpec, input_hw: tuple[int, int] | None = None
    ) -> int:
        """Multiply-accumulates of the factorized forward for one sample, in the
        contraction order the layer uses for a single sample (bias not counted)."""

    def check_kind(self, geometry: LayerGeometry, layer_name: str) -> None:
        if geometry.kind not in self.kinds:
            raise ValueError(
                f"{layer_name}: format {self.name!r} does not support {geometry.kind} layers; "
                f"it supports {list(self.kinds)}"
            )


def parse_layer_ranks(ranks: Any, n: int, layer_name: str, count_hint: str) -> list[int]:
    """``ranks`` as ``n`` ints >= 1 (one int, a 1-sequence or an ``n``-sequence); a wrong
    count raises ValueError ending in ``count_hint`` (what the format takes)."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.tolist()
    if isinstance(ranks, Sequence) and not isinstance(ranks, str):
        vals = list(ranks)
        if len(vals) == 1:
            vals = vals * n
        if len(vals) != n:
            raise ValueError(
                f"{layer_name}: ranks {list(ranks)} has {len(vals)} entries, but {count_hint}"
            )
    else:
        vals = [ranks] * n
    for v in vals:
        if not _is_int(v):  # (numpy integers too, as the tensor functions take them)
            raise TypeError(f"{layer_name}: ranks must be ints >= 1, got {ranks!r}")
        if v < 1:
            raise ValueError(f"{layer_name}: ranks must be ints >= 1, got {ranks!r}")
    return [int(v) for v in vals]


_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format instance to the registry under ``fmt.name`` (replacing any previous)."""
    if not isinstance(fmt, Format):
        raise TypeError(f"fmt must be a Format instance, got {type(fmt).__name__}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format called ``name`` (``"tt"``, ``"tr"``, ``"tucker2"``, ``"svd"``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}; available formats are {sorted(_REGISTRY)}"
        ) from None


def available_formats() -> list[str]:
    return sorted(_REGISTRY)
