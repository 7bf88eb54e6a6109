"""Model surgery: swap the planned dense layers for factorized ones (Algorithm 2, last step)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from tdcompress.planning import CompressionPlan, LayerPlan

__all__ = ["decompose", "DecompositionReport"]


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
    fmt = lp.format
    if init == "random":
        return fmt.build_initialized(lp.geometry, lp.spec, device=weight.device, dtype=weight.dtype)
    return fmt.build(lp.geometry, fmt.decompose(weight, lp.spec), lp.spec, bias)


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
    modified.
    """
    if init not in ("decompose", "random"):
        raise ValueError(f"init must be 'decompose' or 'random', got {init!r}")
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    plan.check_model(model)
    unknown = sorted(set(weights or {}) - {lp.param for lp in plan})
    if unknown:
        raise ValueError(
            f"weights has keys {unknown} that are not planned weights; they are "
            f"{[lp.param for lp in plan]} (parameter names, e.g. admm.Z)"
        )
    new = copy.deepcopy(model)
    report = DecompositionReport(params_before=sum(p.numel() for p in model.parameters()))
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
    return new, report


def _rel_err(w: torch.Tensor, approx: torch.Tensor) -> float:
    wn = torch.linalg.vector_norm(w.float())
    return float(torch.linalg.vector_norm(w.float() - approx.float()) / wn.clamp_min(1e-30))
