"""The training phase of a pipeline: epochs of (ADMM-)training, resumable per epoch from
``<phase>.ckpt.pt``, with the optimizer and learning-rate schedule a phase's config names.

:class:`TrainingPhase` is a part of :class:`~tdcompress.pipeline.Pipeline`, which gives
the data, the plan, the teacher, the metrics log and the kept copy it reads.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from tdcompress.admm import ADMM, ADMMSchedule
from tdcompress.config import OPTIMIZERS, SCHEDULES, OptimConfig, PhaseConfig
from tdcompress.serialization import load_model_state
from tdcompress.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tdcompress.train.distributed import barrier, is_main, wrap_ddp
from tdcompress.train.loop import evaluate, train_epoch


def make_optimizer(params, oc: OptimConfig) -> torch.optim.Optimizer:
    if oc.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=oc.lr,
            momentum=oc.momentum,
            weight_decay=oc.weight_decay,
            nesterov=oc.nesterov and oc.momentum > 0,
        )
    if oc.name == "adam":
        return torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay)
    if oc.name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay)
    raise ValueError(f"optim.name must be one of {list(OPTIMIZERS)}, got {oc.name!r}")


def lr_factor(oc: OptimConfig, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based) of ``epochs``."""
    if epoch < oc.warmup_epochs:
        return (epoch + 1) / (oc.warmup_epochs + 1)
    if oc.schedule == "constant":
        return 1.0
    if oc.schedule == "cosine":
        e, n = epoch - oc.warmup_epochs, max(1, epochs - oc.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * e / n))
    if oc.schedule == "step":
        return oc.gamma ** sum(epoch >= m * epochs for m in oc.milestones)
    raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {oc.schedule!r}")


class TrainingPhase:
    """The per-epoch training phase (a part of :class:`~tdcompress.pipeline.Pipeline`)."""

    def _compiled(self, ddp: nn.Module, model: nn.Module, loader: Any) -> nn.Module:
        """``ddp`` under ``torch.compile`` when ``runtime.compile`` is set (else as is), with
        the factorized layers' plans warmed for the batch shapes ``loader`` yields (its
        full batches and its last, smaller one), so the compiled forward has no graph break.
        Evaluation stays eager."""
        c = self.cfg.runtime.compile
        if c is False:
            return ddp
        from tdcompress.layers import warm_plans

        images = getattr(loader, "images", None)
        if images is not None:  # a TensorLoader: its batch sizes are known in advance
            bs, n = loader.batch_size, loader.num_samples
            sizes = {bs} if n >= bs else set()
            if n % bs and not loader.drop_last:
                sizes.add(n % bs)
            shapes = [(b, *images.shape[1:]) for b in sorted(sizes)]
            warm_plans(
                model, shapes, channels_last=self.cfg.runtime.channels_last, device=self.device
            )
        backend = "inductor" if c is True else c
        return torch.compile(ddp, backend=backend, dynamic=False)

    def _train_phase(
        self, name: str, model: nn.Module, phase: PhaseConfig, admm_cfg: Any = None
    ) -> dict[str, Any]:
        """Train ``model`` for ``phase.epochs`` epochs, resumable per epoch from
        ``<name>.ckpt.pt``; with ``admm_cfg`` the ADMM state is trained and saved too."""
        train_loader, test_loader, _ = self.data()
        ddp = self._compiled(wrap_ddp(model), model, train_loader)
        opt = make_optimizer(model.parameters(), phase.optim)
        base_lrs = [g["lr"] for g in opt.param_groups]
        admm = None
        if admm_cfg is not None:
            admm = ADMM(
                model,
                self.load_plan(),
                rho=admm_cfg.rho,
                mode=admm_cfg.mode,
                schedule=ADMMSchedule(admm_cfg.every_steps, admm_cfg.rho_growth, admm_cfg.rho_max),
            )
        teacher = self._teacher() if phase.distill_weight > 0 else None
        ckpt = self.out / f"{name}.ckpt.pt"
        start = 0
        scaler = torch.amp.GradScaler("cuda") if self.cfg.runtime.amp == "fp16" else None
        if ckpt.exists():
            st = load_checkpoint(ckpt, map_location=self.device)
            load_model_state(model, st["model"])  # (records filled in for older runs)
            opt.load_state_dict(st["optimizer"])
            if admm is not None:
                admm.load_state_dict(st["admm"])
            if scaler is not None and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])  # its scale, as an unbroken run has it
            set_rng_state(st["rng"])
            start = st["epoch"]
        last: dict[str, Any] = {}
        for epoch in range(start, phase.epochs):
            f = lr_factor(phase.optim, epoch, phase.epochs)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            if admm is not None and admm_cfg.every_steps is None and epoch > 0:
                admm.update()  # the paper's rhythm: Z and U at the start of every epoch
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            t0 = time.time()
            tr = train_epoch(
                ddp,
                train_loader,
                opt,
                device=self.device,
                admm=admm,
                amp=self.cfg.runtime.amp,
                scaler=scaler,
                desc=f"{name} {epoch + 1}/{phase.epochs}",
                progress=self.cfg.runtime.progress,
                teacher=teacher,
                distill_weight=phase.distill_weight,
                distill_temperature=phase.distill_temperature,
                label_smoothing=phase.label_smoothing,
            )
            if not math.isfinite(tr["loss"]):
                kept = f"{ckpt} (after epoch {epoch})" if ckpt.exists() else "none"
                raise FloatingPointError(
                    f"{name} epoch {epoch + 1}/{phase.epochs}: the training loss is "
                    f"{tr['loss']} (diverged) at {name}.optim.lr={opt.param_groups[0]['lr']:g}; "
                    f"lower {name}.optim.lr or set {name}.optim.warmup_epochs. Nothing of this "
                    f"epoch was saved; last checkpoint kept: {kept}"
                )
            ev = evaluate(model, test_loader, device=self.device, amp=self.cfg.runtime.amp)
            last = {
                "phase": name,
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": tr["loss"],
                "train_acc": tr["acc"],
                "test_loss": ev["loss"],
                "test_acc": ev["acc"],
                "seconds": time.time() - t0,
            }
            # train_loss is the (label-smoothed) CE, without the distillation term; test_loss
            # is plain CE: the rows say which, for readers of the curves
            if phase.label_smoothing:
                last["label_smoothing"] = phase.label_smoothing
            if teacher is not None and phase.distill_weight:
                last["distill_weight"] = phase.distill_weight
            if admm is not None:
                last["rho"] = admm.rho
                last.update({f"admm/{k}": v for k, v in admm.residuals().items()})
            self.log.write(**last)
            if is_main():
                msg = f"[{name}] epoch {epoch + 1}/{phase.epochs} loss {tr['loss']:.4f} "
                msg += f"train {tr['acc']:.4f} test {ev['acc']:.4f}"
                if admm is not None:
                    msg += f" |W-Z|/|W| {admm.residuals()['primal']:.4f}"
                print(msg, flush=True)
                save_checkpoint(
                    ckpt,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "admm": admm.state_dict() if admm is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_state(),
                    },
                )
                self._mirror()
            barrier()
        return {"model": model, "admm": admm, "last": last}
