"""The compression pipeline: dense training, plan, ADMM, decompose, fine-tune, evaluate, report.

Every stage writes atomic checkpoints into ``runtime.out_dir``; a stage interrupted at any
point resumes from its last finished epoch, and finished stages other than evaluate and
report (which always run again) are skipped, so rerunning the same command after a crash
or kill continues the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdcompress.admm import ADMM, ADMMSchedule
from tdcompress.config import (
    OPTIMIZERS,
    SCHEDULES,
    Config,
    OptimConfig,
    PhaseConfig,
    read_json,
)
from tdcompress.planning import CompressionPlan, plan
from tdcompress.serialization import load_compressed, load_model_state, save_compressed
from tdcompress.surgery import decompose
from tdcompress.train.checkpoint import (
    atomic_write_text,
    copy_atomic,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tdcompress.train.distributed import (
    barrier,
    default_device,
    init_distributed,
    is_main,
    main_says,
    rank,
    world_size,
    wrap_ddp,
)
from tdcompress.train.keep import mirror_run_folder, restore_run_folder
from tdcompress.train.loop import MetricsLog, evaluate, read_metrics, train_epoch

if TYPE_CHECKING:
    from tdcompress.export import ExportResult

__all__ = ["Pipeline", "STAGES"]

STAGES = ("train", "plan", "admm", "decompose", "finetune", "evaluate", "report")
#: the run's models ``export`` writes (file stem -> the stage that writes it)
EXPORT_WEIGHTS = {"finetuned": "finetune", "decomposed": "decompose", "dense": "train"}


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return default_device()
    return torch.device(spec)


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


# Config keys each stage's result depends on (a dotted key covers its sub-keys); once the
# stage has started in an out_dir, resuming with other values there is refused.
_STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "train": (
        "seed",
        "data",
        "model",
        "dense",
        "runtime.amp",
        "runtime.channels_last",
        "runtime.dense_checkpoint",
    ),
    "plan": ("compress",),
    "admm": ("admm",),
    "finetune": ("finetune",),
}
_STAGE_PHASE = {"train": "dense"}  # stage -> name of its per-epoch checkpoint
# Stages another run folder can lend (Pipeline.reuse_stages), in order, and their files.
_REUSABLE = ("train", "plan", "admm", "decompose", "finetune")
_STAGE_FILES = {
    "train": ("dense.pt",),
    "plan": ("plan.yaml",),
    "admm": ("admm.pt",),
    "decompose": ("decomposed.pt",),
    "finetune": ("finetuned.pt",),
}
# Where the data lives and how the run is executed do not change its result.
_FREE_KEYS = frozenset({"data.root", "data.download"})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(old: dict[str, Any], cfg: Config, guarded: list[str]) -> list[str]:
    """``"key: was .., now .."`` for each setting under ``guarded`` (dotted prefixes) in
    which the flattened config ``old`` differs from ``cfg``."""
    new = _flatten(cfg.to_dict())
    return [
        f"{k}: was {old.get(k)!r}, now {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if k not in _FREE_KEYS
        and any(k == g or k.startswith(g + ".") for g in guarded)
        and old.get(k) != new.get(k)
    ]


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values put in, section by section."""
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(base.get(k), dict)
        out[k] = _merged(base[k], v) if both else v
    return out


class Pipeline:
    """Runs the stages of one :class:`~tdcompress.config.Config`; see the module docstring."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        init_distributed()
        self.device = _device(cfg.runtime.device)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.out = Path(cfg.runtime.out_dir)
        self.keep = Path(cfg.runtime.keep_dir) if cfg.runtime.keep_dir else None
        if self.keep is not None and is_main() and restore_run_folder(self.out, self.keep):
            print(f"[run] {self.out} started from the kept state in {self.keep}", flush=True)
        barrier()
        self._check_config_unchanged()  # early; again under the run lock, which writes it
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self._data: tuple[Any, Any, dict[str, Any]] | None = None

    # ---------------------------------------------------------------- state
    def _started(self) -> list[str]:
        """Stages that finished or left a per-epoch checkpoint in ``out_dir``."""
        done = self.state()["done"] if self._state_path.exists() else {}
        return [
            s
            for s in _STAGE_CONFIG
            if s in done or (self.out / f"{_STAGE_PHASE.get(s, s)}.ckpt.pt").exists()
        ]

    def _check_config_unchanged(self) -> None:
        """Refuse to resume a run folder whose started stages used different settings.

        A resumed stage would otherwise mix two configurations silently (e.g. an ADMM phase
        half at one learning rate, half at another). Settings of stages that have not
        started yet may change freely; so may the data root, device, threads and progress.
        """
        old_path = self.out / "config.json"
        if not old_path.exists():
            return
        # A key missing from an older config.json did not exist when that run was written,
        # which ran as its default does now (settings are added with a neutral default).
        started = self._started()
        guarded = [k for s in started for k in _STAGE_CONFIG[s]]
        changed = _changed_keys(self._config_of(self.out), self.cfg, guarded)
        if changed:
            raise ValueError(
                f"runtime.out_dir {str(self.out)!r} holds a run whose started stages "
                f"({', '.join(started)}) used other settings: "
                + "; ".join(changed)
                + ". Restore those settings to resume, or choose a new runtime.out_dir "
                "(or delete the folder) to start over."
            )

    def _config_of(self, run_dir: Path) -> dict[str, Any]:
        """The flattened config a run folder was written with. A key missing from an older
        config.json did not exist then, and that run ran as its default does now."""
        saved = read_json(run_dir / "config.json", "the settings of that run")
        return _flatten(_merged(type(self.cfg)().to_dict(), saved))

    def reuse_stages(self, src: str | Path) -> list[str]:
        """Take the finished stages of the run folder ``src`` (their files, state records
        and metrics rows) in order for as long as each one's settings, and those of the
        stages before it, equal this config's and its files are there: one ADMM phase, then
        several fine-tunings, say. Needs an ``out_dir`` with no stage started, or one that
        was given the same ``src`` before (then nothing is done, so the command can be
        rerun, even once ``src`` is gone). Returns the stages taken."""
        src_dir = Path(src).resolve()
        key = str(src_dir)
        # rank 0's view throughout: it writes the state, the other ranks may be behind
        if main_says(self.state().get("reused_from") == key, self.device):
            return []
        if not (src_dir / "config.json").is_file() or not (src_dir / "state.json").is_file():
            raise FileNotFoundError(
                f"reuse source {str(src)!r} is not a run folder (it needs config.json and "
                "state.json)"
            )
        if src_dir == self.out.resolve():
            raise ValueError(f"reuse source {str(src)!r} is this run's own out_dir")
        if main_says(bool(self._started()), self.device):
            raise ValueError(
                f"runtime.out_dir {str(self.out)!r} already holds started stages "
                f"({', '.join(self._started())}) and was not given this reuse source "
                "before: stages are reused into a fresh run folder (to resume this one, "
                "drop --reuse-from)"
            )
        old = self._config_of(src_dir)
        done = read_json(src_dir / "state.json", "its finished stages")
        done = done["done"]
        taken: list[str] = []
        guarded: list[str] = []
        for s in _REUSABLE:
            guarded += _STAGE_CONFIG.get(s, ())
            if s not in done or _changed_keys(old, self.cfg, guarded):
                break
            if not all((src_dir / f).is_file() for f in self._files_needed(s, done[s])):
                break  # (a stage recorded as done whose files were removed)
            taken.append(s)
        with self._exclusive():
            if is_main():
                for s in taken:
                    for name in _STAGE_FILES[s]:
                        if (src_dir / name).is_file():
                            copy_atomic(src_dir / name, self.out / name)
                # the folder has no started stage, so any rows there are of an interrupted
                # copy: replaced, not appended to
                phases = {_STAGE_PHASE.get(s, s) for s in taken}
                rows = [
                    r for r in read_metrics(src_dir / "metrics.jsonl") if r.get("phase") in phases
                ]
                text = "".join(json.dumps(r) + "\n" for r in rows)
                atomic_write_text(self.out / "metrics.jsonl", text)
                st = self.state()
                st["done"].update({s: dict(done[s], reused_from=key) for s in taken})
                st["reused_from"] = key  # last: a kill before it leaves a rerunnable copy
                atomic_write_text(self._state_path, json.dumps(st, indent=2))
            barrier()
        return taken

    def _files_needed(self, stage: str, record: dict[str, Any]) -> tuple[str, ...]:
        """The files a finished ``stage`` with state ``record`` must have left to be reused:
        all of :data:`_STAGE_FILES` but a skipped ADMM phase's ``admm.pt`` and a deferred
        train stage's ``dense.pt`` when this config never reads the dense weights."""
        if stage == "admm" and "skipped" in record:
            return ()
        if stage == "train" and "deferred" in record and dense_weights_unused(self.cfg):
            return ()
        return _STAGE_FILES[stage]

    @property
    def _state_path(self) -> Path:
        return self.out / "state.json"

    def state(self) -> dict[str, Any]:
        if self._state_path.exists():
            return read_json(self._state_path, "this run's finished stages")
        return {"done": {}}

    def _mark_done(self, stage: str, result: dict[str, Any]) -> None:
        if is_main():
            st = self.state()
            st["done"][stage] = result
            atomic_write_text(self._state_path, json.dumps(st, indent=2))
            self._mirror()
        barrier()

    def _mirror(self) -> None:
        """Bring ``runtime.keep_dir`` (if set) up to date with the run folder (rank 0
        only: no collective here)."""
        if self.keep is not None:
            mirror_run_folder(self.out, self.keep, self.state()["done"])

    def done(self, stage: str) -> bool:
        return stage in self.state()["done"]

    # ---------------------------------------------------------------- data / models
    def data(self):
        if self._data is None:
            from tdcompress.data import make_loaders

            self._data = make_loaders(
                self.cfg.data,
                device=self.device,
                seed=self.cfg.seed,
                rank=rank(),
                world_size=world_size(),
                channels_last=self.cfg.runtime.channels_last,
            )
        return self._data

    def dataset_info(self) -> dict[str, Any]:
        """Classes, input shape, mean and std of the configured dataset (read from its
        description, so building a model or exporting one needs no data files)."""
        from tdcompress.data import DATASETS

        return dict(DATASETS[self.cfg.data.dataset])  # (what make_loaders returns too)

    def dense_model(self) -> nn.Module:
        from tdcompress.models import build_model

        info = self.dataset_info()
        kwargs = dict(self.cfg.model.kwargs)
        torch.manual_seed(self.cfg.seed)
        model = build_model(
            self.cfg.model.name, **_model_defaults(self.cfg.model.name, info, kwargs)
        )
        return self._prepare(model)

    def _prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.dataset_info()["input_shape"])

    def load_plan(self) -> CompressionPlan:
        return CompressionPlan.load(self.out / "plan.yaml")

    def compressed_model(self, checkpoint: str = "finetuned.pt") -> nn.Module:
        """The run's factorized model holding the weights of ``out_dir/checkpoint``
        (``decomposed.pt`` or ``finetuned.pt``), rebuilt by
        :func:`tdcompress.load_compressed` from the dense architecture, nothing decomposed;
        a file written before the layers kept their records loads with ``plan.yaml``."""
        model = load_compressed(
            self.out / checkpoint,
            self.dense_model(),
            plan=self.load_plan(),
            map_location=self.device,
        )
        return self._prepare(model)

    def _save_compressed(self, model: nn.Module, checkpoint: str) -> None:
        save_compressed(model, self.out / checkpoint, plan=self.load_plan())

    def _dense_from(self, checkpoint: str) -> nn.Module:
        """The dense architecture holding the weights of ``out_dir/checkpoint``."""
        deferred = self.state()["done"].get("train", {}).get("deferred")
        if checkpoint == "dense.pt" and deferred and not (self.out / checkpoint).exists():
            raise FileNotFoundError(
                f"this run's train stage deferred its dense model ({deferred!r} did not exist "
                "and a from-scratch run does not read it), but the settings now need its "
                "weights (ADMM or distillation): once that file exists, rerun the train stage "
                "with --force (`tdcompress train <config> --force`), then the rest"
            )
        model = self.dense_model()
        model.load_state_dict(load_checkpoint(self.out / checkpoint, self.device)["model"])
        return model

    def _teacher(self) -> nn.Module:
        """The run's dense model (``dense.pt``), frozen, for knowledge distillation."""
        with torch.random.fork_rng(devices=[]):  # building it must not move the run's RNG
            teacher = self._dense_from("dense.pt")
        return teacher.eval().requires_grad_(False)

    # ---------------------------------------------------------------- phases
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

    # ---------------------------------------------------------------- stages
    def stage_train(self) -> None:
        model = self.dense_model()
        if self.cfg.runtime.dense_checkpoint:
            path = Path(self.cfg.runtime.dense_checkpoint)
            if not main_says(path.is_file(), self.device):  # the ranks must agree
                if dense_weights_unused(self.cfg):
                    # from scratch: the dense run may still be training; its accuracy is read
                    # at the evaluate stage, which refuses until it exists (stage_evaluate)
                    if is_main():
                        print(
                            f"[train] runtime.dense_checkpoint {str(path)!r} not there yet: "
                            "the from-scratch run does not use its weights; the evaluate "
                            "stage reads its accuracy",
                            flush=True,
                        )
                    self._mark_done(
                        "train", {"test_acc": None, "params": _params(model), "deferred": str(path)}
                    )
                    return
                raise FileNotFoundError(
                    f"runtime.dense_checkpoint {str(path)!r} does not exist: train the dense "
                    "model first (e.g. `tdcompress train <its dense config>`) or unset it"
                )
            self._load_dense_checkpoint(model, path)
        else:
            self._train_phase("dense", model, self.cfg.dense)
        self._mark_done("train", {"test_acc": self._keep_dense(model), "params": _params(model)})

    def _load_dense_checkpoint(self, model: nn.Module, path: Path) -> nn.Module:
        """``model`` holding the weights of the dense checkpoint ``path`` (a training
        checkpoint or a bare state dict)."""
        st = load_checkpoint(path, map_location=self.device)
        try:
            model.load_state_dict(st.get("model", st))
        except RuntimeError as e:  # (another architecture: missing, unexpected or other shapes)
            raise ValueError(
                f"runtime.dense_checkpoint {str(path)!r} does not fit model "
                f"{self.cfg.model.name!r} {self.cfg.model.kwargs or ''}: {e}; point it at "
                "a checkpoint of this model"
            ) from None
        return model

    def _keep_dense(self, model: nn.Module) -> float:
        """Save ``model`` as the run's ``dense.pt``; its test accuracy (fp32)."""
        acc = evaluate(model, self.data()[1], device=self.device)["acc"]
        if is_main():
            save_checkpoint(self.out / "dense.pt", {"model": model.state_dict()})
        return acc

    def stage_plan(self) -> CompressionPlan:
        model = self.dense_model()
        p = plan(model, config=self.cfg.compress, input_shape=self.input_shape())
        if is_main():
            p.save(self.out / "plan.yaml")
            print(p.summary(), flush=True)
        self._mark_done("plan", {"ratio": p.ratio, "macs_reduction": p.macs_reduction})
        return p

    def stage_admm(self) -> None:
        if self.cfg.admm.epochs == 0:  # plain decomposition (or from scratch): no ADMM phase
            self._mark_done("admm", {"skipped": "admm.epochs is 0"})
            return
        model = self._dense_from("dense.pt")
        res = self._train_phase("admm", model, self.cfg.admm, admm_cfg=self.cfg.admm)
        admm = res["admm"]
        admm.update()
        ev = evaluate(model, self.data()[1], device=self.device)
        resid = admm.residuals(decomposition_error=True)
        if is_main():
            save_checkpoint(
                self.out / "admm.pt", {"model": model.state_dict(), "admm": admm.state_dict()}
            )
        self._mark_done("admm", {"test_acc": ev["acc"], "residuals": resid})

    def stage_decompose(self) -> None:
        if self.cfg.compress.init == "random":  # the factorized architecture from scratch
            new, report = decompose(self.dense_model(), self.load_plan(), init="random")
            new = self._prepare(new)
            src = self._reinitialize(new)
        else:
            src = "admm.pt" if (self.out / "admm.pt").exists() else "dense.pt"
            new, report = decompose(self._dense_from(src), self.load_plan())
            new = self._prepare(new)
        ev = evaluate(new, self.data()[1], device=self.device)
        if is_main():
            self._save_compressed(new, "decomposed.pt")
            print(report, flush=True)
        self._mark_done(
            "decompose",
            {
                "test_acc": ev["acc"],
                "errors": report.errors,
                "params": report.params_after,
                "source": src,
            },
        )

    def _reinitialize(self, model: nn.Module) -> str:
        """``compress.init: random``: the factorized layers re-drawn from the run's seed (the
        rest of ``model`` already holds the seeded dense initialisation)."""
        from tdcompress.layers._base import FactorizedLayer

        torch.manual_seed(self.cfg.seed)
        n = 0
        for m in model.modules():
            if isinstance(m, FactorizedLayer):
                m.reset_parameters()
                n += 1
        return f"random init ({n} factorized layers)"

    def stage_finetune(self) -> None:
        model = self.compressed_model("decomposed.pt")
        self._train_phase("finetune", model, self.cfg.finetune)
        ev = evaluate(model, self.data()[1], device=self.device)
        if is_main():
            self._save_compressed(model, "finetuned.pt")
        self._mark_done("finetune", {"test_acc": ev["acc"]})

    def _deferred_dense_acc(self, path: Path) -> float:
        """The accuracy of the dense checkpoint a from-scratch run deferred at its train
        stage; refuses (keeping every trained stage) while it is still missing."""
        if not main_says(path.is_file(), self.device):  # the ranks must agree
            raise FileNotFoundError(
                f"runtime.dense_checkpoint {str(path)!r} does not exist yet: this from-scratch "
                "run has trained, but its evaluation compares with that dense model. Train "
                "it (`tdcompress train <its dense config>`), then rerun the same command "
                "(the finished stages are kept)"
            )
        return self._keep_dense(self._load_dense_checkpoint(self.dense_model(), path))

    def stage_evaluate(self) -> dict[str, Any]:
        st = self.state()["done"]
        train = st.get("train", {})
        dense_acc = train.get("test_acc")
        if "deferred" in train:
            dense_acc = self._deferred_dense_acc(Path(train["deferred"]))
        p = self.load_plan()
        dense = self.dense_model()
        result = {
            "dense_acc": dense_acc,
            "dense_params": _params(dense),
            "admm_acc": st.get("admm", {}).get("test_acc"),
            "decomposed_acc": st.get("decompose", {}).get("test_acc"),
            "finetuned_acc": None,
            "compressed_params": p.compressed_params,
            "ratio": p.ratio,
            "layers_ratio": p.layers_ratio,
            "macs_reduction": p.macs_reduction,
            "format": self.cfg.compress.format,
            # what the accuracies were measured on (data.validation: a held-out part of train)
            "evaluated_on": (
                f"validation ({self.cfg.data.validation} held out of the training set)"
                if self.cfg.data.validation
                else "test"
            ),
        }
        if (self.out / "finetuned.pt").exists():
            model = self.compressed_model("finetuned.pt")
            result["finetuned_acc"] = evaluate(model, self.data()[1], device=self.device)["acc"]
            result["compressed_params"] = _params(model)
        self._mark_done("evaluate", result)
        return result

    def stage_report(self) -> str:
        from tdcompress.report import write_report

        text = write_report(
            self.out,
            self.state()["done"].get("evaluate", {}),
            read_metrics(self.log.path, per_epoch=True),
            self.load_plan(),
            self.cfg,
        )
        self._mark_done("report", {"path": str(self.out / "report.md")})
        return text

    # ---------------------------------------------------------------- export
    def export(
        self,
        path: str | Path | None = None,
        format: str = "onnx",
        weights: str = "finetuned",
        batch_size: int = 1,
        dynamic_batch: bool = False,
        debug_metadata: bool = False,
        choose_execution: bool = False,
    ) -> ExportResult:
        """Write the run's ``weights`` model ("finetuned", "decomposed" or "dense") as
        ``format`` ("onnx" or "pt2") for inputs of ``batch_size`` samples (any batch size
        with ``dynamic_batch``, planned for ``batch_size`` but at least 2; ``debug_metadata``
        keeps ONNX's per-node provenance), checked against
        the eager model (:func:`tdcompress.export.export_model`). ``choose_execution``: the
        factorized layers first measure here whether they run faster factorized or through
        their kernel rebuilt from the cores (as folded at load by the runtime:
        :func:`tdcompress.layers.choose_execution` with ``folded=True``); the rebuilt ones are
        subgraphs of the cores in the file, which keeps the compressed size. Default ``path``:
        ``<out_dir>/model.<format>`` (``model-<weights>.<format>`` for the other weights)."""
        from tdcompress.export import EXPORT_FORMATS, export_model

        if world_size() > 1:  # every rank would write the same file
            raise RuntimeError(
                f"export runs in one process, not under torchrun ({world_size()} ranks): "
                "run `tdcompress export` on its own"
            )
        stage = EXPORT_WEIGHTS
        if weights not in stage:
            raise ValueError(f"weights must be one of {sorted(stage)}, got {weights!r}")
        if format not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {sorted(EXPORT_FORMATS)}, got {format!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        ckpt = self.out / f"{weights}.pt"
        deferred = self.state()["done"].get("train", {}).get("deferred")
        if weights == "dense" and deferred and not ckpt.is_file():
            raise FileNotFoundError(
                f"{str(ckpt)!r} does not exist: this from-scratch run's train stage deferred "
                f"the dense model ({deferred!r}); its evaluate stage copies it here, or export "
                "it from the run that trained it"
            )
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{str(ckpt)!r} does not exist: run the {stage[weights]} stage of this config "
                f"first (weights={weights!r})"
            )
        if weights == "dense":
            model = self.dense_model()
            model.load_state_dict(load_checkpoint(ckpt, self.device)["model"])
        else:
            model = self.compressed_model(ckpt.name)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.randn((batch_size, *self.input_shape()[1:]), generator=gen).to(self.device)
        if choose_execution:
            from tdcompress.layers import choose_execution as choose

            shapes = [tuple(x.shape)]
            if dynamic_batch and batch_size == 1:  # (the graph runs the plans of batch 2)
                shapes.append((2, *x.shape[1:]))
            choose(model, shapes, folded=True)
        if path is None:
            tag = "" if weights == "finetuned" else f"-{weights}"
            path = self.out / f"model{tag}{EXPORT_FORMATS[format]}"
        return export_model(
            model,
            x,
            path,
            format=format,
            dynamic_batch=dynamic_batch,
            debug_metadata=debug_metadata,
        )

    # ---------------------------------------------------------------- driver
    def run(self, stages: tuple[str, ...] = STAGES, force: bool = False) -> dict[str, Any]:
        """Run ``stages`` in order, skipping finished ones unless ``force``."""
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages are {list(STAGES)}")
        with self._exclusive():
            for s in stages:
                # rank 0's view: it records a stage as done before the others leave it (they
                # may be behind), and a rank that skipped it would desynchronise the collectives
                skip = not force and s not in ("evaluate", "report")
                if skip and main_says(self.done(s), self.device):
                    if is_main():
                        print(f"[{s}] already done, skipping", flush=True)
                    continue
                getattr(self, f"stage_{s}")()
        return self.state()["done"]

    def _record_config(self) -> None:
        """Check the settings against the folder's ``config.json`` (its started stages may
        have changed since this object was made), then write them there."""
        self._check_config_unchanged()
        atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold an exclusive lock on the run folder (rank 0), so that a second process
        started on the same ``runtime.out_dir`` stops at once instead of interleaving its
        checkpoints with the first one's; then check the settings against the folder's
        ``config.json`` and write it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None
        if fcntl is None or not is_main():
            if is_main():
                self._record_config()
            yield
            return
        path = self.out / "run.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RuntimeError(
                    f"runtime.out_dir {str(self.out)!r} is in use by another process "
                    f"(pid {holder}); wait for it to finish or choose another out_dir"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                # only the holder of the lock records its settings: a process refused here
                # must not rewrite the config.json of the run it was refused from
                self._record_config()
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def dense_weights_unused(cfg: Config) -> bool:
    """True when no stage before the evaluation reads the trained dense weights: the
    factorized model from scratch (``compress.init: random``), no ADMM phase and no
    distillation. The dense model is then only the reference accuracy of the report, so a
    missing ``runtime.dense_checkpoint`` is needed only at the evaluate stage, not at train
    (which records the train stage as deferred)."""
    return (
        cfg.compress.init == "random" and cfg.admm.epochs == 0 and not cfg.finetune.distill_weight
    )


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_defaults(name: str, info: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill ``num_classes`` / input sizes from the dataset unless the config sets them."""
    out = dict(kwargs)
    if name in ("lenet5", "row_transformer"):
        out.setdefault("num_classes", info["num_classes"])
        out.setdefault("in_channels", info["input_shape"][0])
        out.setdefault("image_size", info["input_shape"][1])
    elif name.startswith("resnet"):
        out.setdefault("num_classes", info["num_classes"])
        out.setdefault("in_channels", info["input_shape"][0])
    elif name == "lstm_speech":
        out.setdefault("num_classes", info["num_classes"])
        out.setdefault("input_size", info["input_shape"][-1] - 1)  # less the valid-step channel
    elif name == "mlp":
        out.setdefault("num_classes", info["num_classes"])
        out.setdefault("in_features", int(math.prod(info["input_shape"])))
    return out
