"""ADMM-regularized training toward low-rank weights (problems 6-18 of Yin et al.).

The model stays dense. For every planned weight W the ADMM state holds Z (the projection
onto the low-rank set) and U (the scaled dual variable):

- W-step: the training loss plus ``(rho/2) * sum ||W - Z + U||_F^2`` (Z, U constants),
  either as a graph term (:meth:`ADMM.penalty`) or, equivalently, by adding
  ``rho * (W - Z + U)`` to each weight's gradient (``mode="hook"``, no graph term);
- Z-step: ``Z = project(W + U)``;  U-step: ``U = U + W - Z``  (:meth:`ADMM.update`).

Use it from any training loop::

    admm = ADMM(model, plan, rho=1e-3)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + admm.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
        admm.step()            # Z/U update every `schedule.every_steps` steps, if set
    admm.update()              # or call it yourself, e.g. once per epoch (the paper)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tdcompress.planning import CompressionPlan
from tdcompress.wrappers import unwrap_model

__all__ = ["ADMM", "ADMMSchedule", "MODES"]

#: how the ADMM term reaches the weights (``ADMM(mode=...)``, the config's ``admm.mode``)
MODES = ("penalty", "hook")


@dataclass
class ADMMSchedule:
    """When Z/U are updated and how rho evolves.

    ``every_steps``: :meth:`ADMM.step` calls :meth:`ADMM.update` after this many optimizer
    steps (None: only explicit calls, e.g. once per epoch as in the paper; short budgets
    need frequent updates, see docs). ``rho_growth``: multiply rho by this factor at every
    update (1.0 = constant, the paper's default), capped at ``rho_max``.
    """

    every_steps: int | None = None
    rho_growth: float = 1.0
    rho_max: float = math.inf

    def __post_init__(self) -> None:
        if self.every_steps is not None and (
            isinstance(self.every_steps, bool)
            or not isinstance(self.every_steps, int)
            or self.every_steps < 1
        ):
            raise ValueError(f"every_steps must be None or an int >= 1, got {self.every_steps!r}")
        if not self.rho_growth >= 1.0:
            raise ValueError(f"rho_growth must be >= 1, got {self.rho_growth!r}")


class ADMM:
    """ADMM state (Z, U per planned weight) over a dense model; see the module docstring.

    ``mode="penalty"``: add :meth:`penalty` to the loss. ``mode="hook"``: gradient hooks add
    ``rho * (W - Z + U)`` during backward and :meth:`penalty` returns a detached value for
    logging only; both give the same parameter updates, except under a gradient scaler
    (``torch.amp.GradScaler``, fp16): the hooks add to the scaled gradient, which the
    scaler then divides by its scale, so use ``"penalty"`` there (the pipeline refuses
    ``admm.mode: hook`` with ``runtime.amp: fp16``).
    Under ``torch.distributed`` each rank projects a share of the layers in :meth:`update`
    and broadcasts it, so all ranks end every update with identical Z and U.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: CompressionPlan,
        rho: float = 1e-3,
        *,
        mode: str = "penalty",
        schedule: ADMMSchedule | None = None,
    ) -> None:
        if not isinstance(plan, CompressionPlan):
            raise TypeError(f"plan must be a CompressionPlan, got {type(plan).__name__}")
        if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a positive finite number, got {rho!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be {' or '.join(map(repr, MODES))}, got {mode!r}")
        model = unwrap_model(model)  # DDP / DataParallel / torch.compile wrappers
        plan.check_model(model)
        self.plan = plan
        self.rho = float(rho)
        self.mode = mode
        self.schedule = schedule or ADMMSchedule()
        params = dict(model.named_parameters())
        self._weights: dict[str, nn.Parameter] = {lp.param: params[lp.param] for lp in plan}
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.updates = 0
        self._dual: dict[str, float] = {}
        with torch.no_grad():
            projected = self._project_all({k: w.detach() for k, w in self._weights.items()})
            for k, w in self._weights.items():
                self.Z[k] = projected[k]
                self.U[k] = torch.zeros_like(w)
        self._hooks = []
        if mode == "hook":
            for k, w in self._weights.items():
                self._hooks.append(w.register_hook(self._grad_hook(k)))

    # ---------------------------------------------------------------- W-step
    def _grad_hook(self, key: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            w = self._weights[key].detach()
            return grad + (self.rho * (w - self.Z[key] + self.U[key])).to(grad.dtype)

        return hook

    def penalty(self) -> torch.Tensor:
        """``(rho/2) * sum_l ||W_l - Z_l + U_l||_F^2`` (float32 at least; differentiable in
        ``"penalty"`` mode, detached in ``"hook"`` mode where the hooks apply it)."""
        total = None
        for k, w in self._weights.items():
            w_ = w if self.mode == "penalty" else w.detach()
            dt = torch.promote_types(w.dtype, torch.float32)  # half weights: sum in float32
            d = w_.to(dt) - self.Z[k].to(dt) + self.U[k].to(dt)
            t = d.square().sum()
            total = t if total is None else total + t
        return 0.5 * self.rho * total

    # ---------------------------------------------------------------- Z/U-step
    def _project_all(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Project every layer; under torch.distributed each rank does a share and
        broadcasts it, so every rank ends with bit-identical results."""
        keys = list(x)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        out: dict[str, torch.Tensor] = {}
        for i, k in enumerate(keys):
            lp = self.plan[k]
            if i % world == rank:
                # contiguous: collectives send raw memory
                out[k] = lp.project(x[k]).to(x[k].dtype).contiguous()
            else:
                out[k] = torch.empty_like(x[k])
        if distributed:
            for i, k in enumerate(keys):
                dist.broadcast(out[k], src=i % world)
        return out

    @torch.no_grad()
    def update(self) -> None:
        """Z = project(W + U); U = U + W - Z; then rho follows the schedule."""
        wu = {k: w.detach() + self.U[k] for k, w in self._weights.items()}
        bad = [k for k, v in wu.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(
                f"ADMM update: W + U is not finite for {bad}; training diverged "
                f"(rho={self.rho:g}: lower the learning rate, rho or the schedule's rho_max)"
            )
        z_new = self._project_all(wu)
        for k, w in self._weights.items():
            self._dual[k] = float(self.rho * torch.linalg.vector_norm(z_new[k] - self.Z[k]))
            self.Z[k] = z_new[k]
            self.U[k] = self.U[k] + w.detach() - z_new[k]
        self.updates += 1
        if self.schedule.rho_growth != 1.0:
            self.set_rho(min(self.rho * self.schedule.rho_growth, self.schedule.rho_max))

    def set_rho(self, rho: float) -> None:
        """Change rho, rescaling U so the unscaled dual variable (rho * U) is kept."""
        if not rho > 0:
            raise ValueError(f"rho must be positive, got {rho!r}")
        scale = self.rho / rho
        for k in self.U:
            self.U[k] = self.U[k] * scale
        self.rho = float(rho)

    def step(self) -> bool:
        """Count one optimizer step; run :meth:`update` when the schedule says. Returns
        whether an update ran."""
        self.steps += 1
        every = self.schedule.every_steps
        if every is not None and self.steps % every == 0:
            self.update()
            return True
        return False

    # ---------------------------------------------------------------- monitoring
    @torch.no_grad()
    def residuals(self, decomposition_error: bool = False) -> dict[str, float]:
        """Per layer ``primal/<param>`` = ||W - Z|| / ||W||, ``dual/<param>`` =
        rho ||Z - Z_prev|| (at the last update) and, if asked (one projection per layer),
        ``decomp/<param>`` = ||W - project(W)|| / ||W||; plus overall values (``primal``,
        ``dual``, ``decomp``) over all planned weights together."""
        out: dict[str, float] = {}
        num = den = dnum = 0.0
        for k, w in self._weights.items():
            wn = float(torch.linalg.vector_norm(w.detach().float()))
            pn = float(torch.linalg.vector_norm(w.detach().float() - self.Z[k].float()))
            out[f"primal/{k}"] = pn / max(wn, 1e-30)
            out[f"dual/{k}"] = self._dual.get(k, 0.0)
            num, den = num + pn**2, den + wn**2
            if decomposition_error:
                lp = self.plan[k]
                e = float(torch.linalg.vector_norm(w.detach() - lp.project(w.detach())))
                out[f"decomp/{k}"] = e / max(wn, 1e-30)
                dnum += e**2
        out["primal"] = math.sqrt(num / max(den, 1e-30))
        out["dual"] = math.sqrt(sum(v**2 for v in self._dual.values()))
        if decomposition_error:
            out["decomp"] = math.sqrt(dnum / max(den, 1e-30))
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "Z": {k: v.clone() for k, v in self.Z.items()},
            "U": {k: v.clone() for k, v in self.U.items()},
            "rho": self.rho,
            "mode": self.mode,
            "steps": self.steps,
            "updates": self.updates,
            "dual": dict(self._dual),
            "schedule": asdict(self.schedule),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.Z) - set(state["Z"])
        extra = set(state["Z"]) - set(self.Z)
        if missing or extra:
            raise ValueError(
                f"ADMM state does not match the plan: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        for k in self.Z:
            if state["Z"][k].shape != self.Z[k].shape:
                raise ValueError(
                    f"ADMM state for {k} has shape {tuple(state['Z'][k].shape)}, "
                    f"expected {tuple(self.Z[k].shape)}"
                )
            self.Z[k] = state["Z"][k].to(self.Z[k].device, self.Z[k].dtype).clone()
            self.U[k] = state["U"][k].to(self.U[k].device, self.U[k].dtype).clone()
        self.rho = float(state["rho"])
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])
        self._dual = dict(state.get("dual", {}))
        if "schedule" in state:
            self.schedule = ADMMSchedule(**state["schedule"])

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (``mode="hook"``); the state stays usable."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
