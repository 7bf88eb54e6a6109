"""Model surgery: swap the planned dense layers for factorized ones (Algorithm 2, last step)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdcompress.planning import CompressionPlan, LayerPlan
from tdcompress.wrappers import unwrap_model

__all__ = ["decompose", "compress_", "densify", "DecompositionReport", "INITS"]

#: how decompose() initialises the factors (``init=...``, the config's ``compress.init``)
INITS = ("decompose", "random")


@dataclass
class DecompositionReport:
    """Per-layer relative decomposition error ``||W - W_td|| / ||W||`` and the totals."""

    errors: dict[str, float] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    @property
    def ratio(self) -> float:
        return self.params_before / max(1, self.params_after)

    def __str__(self) -> str:
        lines = [f"{k}: relative error {v:.4g}" for k, v in self.errors.items()]
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} ({self.ratio:.2f}x)")
        return "\n".join(lines)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        path, attr = name.rsplit(".", 1)
        return model.get_submodule(path), attr
    return model, name


def _factorized(
    lp: LayerPlan, weight: torch.Tensor, bias: torch.Tensor | None, init: str
) -> nn.Module:
    from tdcompress.layers.registry import build, build_initialized

    fmt = lp.format
    if init == "random":
        return build_initialized(
            fmt, lp.geometry, lp.spec, device=weight.device, dtype=weight.dtype
        )
    return build(fmt, lp.geometry, fmt.decompose(weight, lp.spec), lp.spec, bias)


@torch.no_grad()
def decompose(
    model: nn.Module,
    plan: CompressionPlan,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    init: str = "decompose",
) -> tuple[nn.Module, DecompositionReport]:
    """A copy of ``model`` whose planned layers are factorized layers built from the
    current dense weights, every other parameter and buffer copied; plus a report of the
    per-layer relative decomposition errors.

    ``weights`` optionally maps planned parameter names to the tensors to decompose
    instead (e.g. ``admm.Z`` to build from Z). ``init="random"`` builds the factorized
    layers at their random initialisation instead, decomposing nothing (the same
    architecture trained from scratch; no errors are reported). The input model is not
    modified (:func:`compress_` changes a model in place).
    """
    model = unwrap_model(model)  # DDP / DataParallel / torch.compile wrappers
    _check_args(model, plan, weights, init)
    new = copy.deepcopy(model)
    return new, _replace_layers(new, plan, weights, init)


def _check_args(
    model: nn.Module, plan: CompressionPlan, weights: dict[str, torch.Tensor] | None, init: str
) -> None:
    if init not in INITS:
        raise ValueError(f"init must be {' or '.join(map(repr, INITS))}, got {init!r}")
    plan.check_model(model)
    unknown = sorted(set(weights or {}) - {lp.param for lp in plan})
    if unknown:
        raise ValueError(
            f"weights has keys {unknown} that are not planned weights; they are "
            f"{[lp.param for lp in plan]} (parameter names, e.g. admm.Z)"
        )


def _replace_layers(
    new: nn.Module,
    plan: CompressionPlan,
    weights: dict[str, torch.Tensor] | None,
    init: str,
) -> DecompositionReport:
    """Swap the planned layers of ``new`` (in place) for factorized ones; the report."""
    report = DecompositionReport(params_before=sum(p.numel() for p in new.parameters()))
    lstm_groups: dict[str, list[LayerPlan]] = {}
    for lp in plan:
        w = (weights or {}).get(lp.param, new.get_parameter(lp.param)).detach()
        w = lp.dense_view(w)  # (Hugging Face's Conv1D stores it transposed)
        mod = new.get_submodule(lp.name.rsplit(".l", 1)[0]) if ".weight_ih_l" in lp.param else None
        if isinstance(mod, nn.LSTM):
            lstm_groups.setdefault(lp.name.rsplit(".l", 1)[0], []).append(lp)
            continue
        dense = new.get_submodule(lp.name)
        bias = dense.bias.detach() if getattr(dense, "bias", None) is not None else None
        layer = _factorized(lp, w, bias, init)
        layer.train(dense.training)
        parent, attr = _parent(new, lp.name)
        setattr(parent, attr, layer)
        if init == "decompose":
            report.errors[lp.name] = _rel_err(w, layer.to_dense())
    for lstm_name, lps in lstm_groups.items():
        from tdcompress.layers.lstm import FactorizedLSTM

        lstm = new.get_submodule(lstm_name)
        inputs: list[nn.Module | None] = [None] * lstm.num_layers
        for lp in lps:
            k = int(lp.param.rsplit("_l", 1)[1])
            w = (weights or {}).get(lp.param, getattr(lstm, f"weight_ih_l{k}")).detach()
            inputs[k] = _factorized(lp, w, None, init)
            if init == "decompose":
                report.errors[lp.name] = _rel_err(w, inputs[k].to_dense())
        flstm = FactorizedLSTM.from_lstm(lstm, inputs)
        parent, attr = _parent(new, lstm_name)
        setattr(parent, attr, flstm)
    report.params_after = sum(p.numel() for p in new.parameters())
    return report


@torch.no_grad()
def compress_(
    model: nn.Module,
    plan_or_format: CompressionPlan | str = "tt",
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    init: str = "decompose",
    **plan_kwargs: Any,
) -> DecompositionReport:
    """Factorize ``model`` in place (as torchao's ``quantize_``): its planned layers are
    replaced by factorized ones built from their weights (``init="random"``: at random
    initialisation); returns the :class:`DecompositionReport`.

    ``plan_or_format``: a :class:`CompressionPlan` of this model, or a format name planned
    here with ``tdcompress.plan(model, format, filter_fn=filter_fn, **plan_kwargs)`` (e.g.
    ``ranks=8`` or ``target_ratio=4``, ``include``/``exclude`` globs). ``filter_fn(module,
    name) -> bool`` keeps only the selected layers it accepts. Build the optimizer (and any
    DDP wrapper) after this call: the replaced layers' parameters are new tensors.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "compress_ changes the model in place: call it on the module before wrapping it "
            "in DistributedDataParallel (or use tdcompress.decompose on model.module)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(plan_or_format, CompressionPlan):
        if plan_kwargs or filter_fn is not None:
            given = sorted(plan_kwargs) + (["filter_fn"] if filter_fn is not None else [])
            raise ValueError(
                f"compress_ got a CompressionPlan and the planning arguments {given}: give "
                "either a plan, or a format name with the arguments of tdcompress.plan"
            )
        p = plan_or_format
    elif isinstance(plan_or_format, str):
        from tdcompress.planning import plan as make_plan

        p = make_plan(model, plan_or_format, filter_fn=filter_fn, **plan_kwargs)
    else:
        raise TypeError(
            "plan_or_format must be a CompressionPlan or a format name (e.g. 'tt'), got "
            f"{type(plan_or_format).__name__}"
        )
    _check_args(model, p, weights, init)
    return _replace_layers(model, p, weights, init)


@torch.no_grad()
def densify(
    model: nn.Module, *, inplace: bool = False, layers: Collection[str] | None = None
) -> nn.Module:
    """``model`` with every factorized layer turned back into a plain ``nn.Linear`` /
    ``nn.Conv2d`` (weight ``to_dense()``, bias, stride, padding and dilation kept) and every
    ``FactorizedLSTM`` into an ``nn.LSTM``: the same function (up to rounding), for tools
    that only know PyTorch's layers. A copy unless ``inplace`` (a model that is itself a
    factorized layer is always returned as a new module). ``layers``: only these
    (module names of factorized layers or LSTMs; e.g. those that run rebuilt for every
    input shape, :func:`tdcompress.layers.rebuilt_everywhere`), the others kept."""
    from tdcompress.layers._base import FactorizedLayer
    from tdcompress.layers.lstm import FactorizedLSTM

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        raise TypeError(f"layers must be a collection of module names, got the str {layers!r}")
    if isinstance(model, (FactorizedLayer, FactorizedLSTM)):
        return _dense_module(model, "model")
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (FactorizedLayer, FactorizedLSTM))
        and not _inside_lstm(model, name)  # (an LSTM's input layers go with it)
    ]
    if layers is not None:
        unknown = sorted(set(layers) - set(found))
        if unknown:
            raise ValueError(
                f"layers names {unknown}, which are not factorized layers or LSTMs of the "
                f"model (outside an LSTM); allowed: {found}"
            )
        found = [n for n in found if n in set(layers)]
    out = model if inplace else copy.deepcopy(model)
    for name in found:
        parent, attr = _parent(out, name)
        setattr(parent, attr, _dense_module(out.get_submodule(name), name))
    return out


def _inside_lstm(model: nn.Module, name: str) -> bool:
    from tdcompress.layers.lstm import FactorizedLSTM

    parts = name.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:k])), FactorizedLSTM)
        for k in range(1, len(parts))
    )


def _dense_module(m: nn.Module, name: str) -> nn.Module:
    try:
        return m.dense_module()  # type: ignore[operator]
    except TypeError as e:  # (an LSTM input layer of another kind: name the module)
        raise TypeError(f"densify: {name}: {e}") from None


def _rel_err(w: torch.Tensor, approx: torch.Tensor) -> float:
    wn = torch.linalg.vector_norm(w.float())
    return float(torch.linalg.vector_norm(w.float() - approx.float()) / wn.clamp_min(1e-30))
