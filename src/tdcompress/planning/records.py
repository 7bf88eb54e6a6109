"""The plan records: LayerPlan (one layer's format, shapes and ranks) and CompressionPlan (all
of them, with the model's totals); YAML/JSON round trip, summary and the check against a
model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdcompress.formats import FactorSpec, LayerGeometry, get_format

#: the key of a plan's ``meta`` that records a solved target: the name of plan()'s argument
_TARGET_META = {"ratio": "target_ratio", "MAC reduction": "target_macs_reduction"}
#: ``meta`` keys of older plan files, read under their current names
_OLD_META_KEYS = {"target_mac_reduction": "target_macs_reduction"}


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
