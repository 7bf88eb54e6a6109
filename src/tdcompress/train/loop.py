"""Training and evaluation loops usable with or without ADMM, DDP and autocast."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tdcompress.train.distributed import all_reduce_sum, is_main

__all__ = ["train_epoch", "evaluate", "autocast_context", "distillation_loss", "MetricsLog"]

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the values ``amp`` may take (the config's ``runtime.amp``): off (None, "none") or a dtype
AMP_MODES = (None, "none", *_AMP)


def autocast_context(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` in {None, "bf16", "fp16"} (fp16 only on CUDA)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp is None or amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' on CPU")
    return torch.autocast(device_type=device.type, dtype=_AMP[amp])


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch
    mean, in at least float32 (the ``T^2`` keeps its gradient on the cross-entropy's scale)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    t = temperature
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def _progress(it: Iterable, desc: str, enabled: bool, total: int | None):
    return tqdm(
        it,
        desc=desc,
        total=total,
        leave=False,
        dynamic_ncols=True,
        disable=not (enabled and is_main()),
    )


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    admm: Any = None,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
    progress: bool = True,
    max_steps: int | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """One pass over ``loader`` with cross-entropy (+ the ADMM penalty when ``admm`` is
    given; its Z/U updates run through ``admm.step()`` per its schedule). With a
    ``teacher`` and ``distill_weight`` w > 0 the data term is
    ``(1 - w) * CE + w * distillation_loss(student, teacher, distill_temperature)``; CE uses
    ``label_smoothing`` (0: plain cross-entropy), and the returned loss is that CE.
    Loss (the cross-entropy) and accuracy are accumulated on the device and synchronised
    every 20 steps for display. Returns mean loss, accuracy and the sample count over all
    ranks."""
    distill = teacher is not None and distill_weight > 0
    if distill:
        teacher.eval()
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = _progress(loader, desc, progress, total)
    for step, (x, y) in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, amp):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
            if distill:
                with torch.no_grad():
                    soft = teacher(x)
                data = (1 - distill_weight) * loss + distill_weight * distillation_loss(
                    out, soft, distill_temperature
                )
            else:
                data = loss
        full = data + admm.penalty() if admm is not None and admm.mode == "penalty" else data
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(full).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            full.backward()
            optimizer.step()
        if admm is not None:
            admm.step()
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (out.detach().argmax(1) == y).sum()
        count += n
        if step % 20 == 0 and bar.disable is False:
            post = {
                "loss": f"{float(loss_sum / count):.4f}",
                "acc": f"{float(correct / count):.4f}",
            }
            if admm is not None:
                post["W-Z"] = f"{admm.residuals()['primal']:.3g}"
            bar.set_postfix(post)
    stats = all_reduce_sum(torch.stack([loss_sum, correct, count]))
    return {
        "loss": float(stats[0] / stats[2].clamp_min(1)),
        "acc": float(stats[1] / stats[2].clamp_min(1)),
        "n": int(stats[2]),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp: str | None = None,
    desc: str = "eval",
    progress: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``loader`` (all ranks)."""
    was = model.training
    model.eval()
    stats = torch.zeros(3, device=device, dtype=torch.float64)
    total = len(loader) if hasattr(loader, "__len__") else None
    for x, y in _progress(loader, desc, progress, total):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, amp):
            out = model(x).float()
        stats[0] += F.cross_entropy(out, y, reduction="sum").double()
        stats[1] += (out.argmax(1) == y).sum()
        stats[2] += y.shape[0]
    model.train(was)
    stats = all_reduce_sum(stats)
    return {
        "loss": float(stats[0] / stats[2].clamp_min(1)),
        "acc": float(stats[1] / stats[2].clamp_min(1)),
        "n": int(stats[2]),
    }


class MetricsLog:
    """Append-only JSON-lines metrics file (written by rank 0 only)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None and is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.path is None or not is_main():
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path) if self.path is not None else []


def read_metrics(path: str | Path, per_epoch: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it does not exist). ``per_epoch``: one
    record per (phase, epoch), the last written (an epoch logged again after a resume counts
    once), phases in the order they first appear, epochs ascending."""
    path = Path(path)
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not per_epoch:
        return recs
    last = {(r.get("phase"), r.get("epoch")): r for r in recs}
    phases = list(dict.fromkeys(p for p, _ in last))
    return sorted(last.values(), key=lambda r: (phases.index(r.get("phase")), r.get("epoch")))
