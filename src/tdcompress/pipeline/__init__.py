"""The compression pipeline: dense training, plan, ADMM, decompose, fine-tune, evaluate, report.

Every stage writes atomic checkpoints into ``runtime.out_dir``; a stage interrupted at any
point resumes from its last finished epoch, and finished stages other than evaluate and
report (which always run again) are skipped, so rerunning the same command after a crash
or kill continues the run.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdcompress.config import Config
from tdcompress.layers import set_model_execution
from tdcompress.pipeline.phase import (
    TrainingPhase,
    lr_factor,  # noqa: F401 (re-exported)
    make_optimizer,  # noqa: F401 (re-exported)
)
from tdcompress.pipeline.runfolder import (
    _FREE_KEYS,  # noqa: F401 (re-exported)
    _REUSABLE,  # noqa: F401 (re-exported)
    _STAGE_CONFIG,  # noqa: F401 (re-exported)
    _STAGE_FILES,  # noqa: F401 (re-exported)
    _STAGE_PHASE,  # noqa: F401 (re-exported)
    RunFolder,
    _changed_keys,  # noqa: F401 (re-exported)
    _flatten,  # noqa: F401 (re-exported)
    _merged,  # noqa: F401 (re-exported)
    dense_weights_unused,
)
from tdcompress.planning import CompressionPlan, plan
from tdcompress.serialization import load_compressed, save_compressed
from tdcompress.surgery import decompose
from tdcompress.train.checkpoint import load_checkpoint, save_checkpoint
from tdcompress.train.distributed import (
    barrier,
    default_device,
    init_distributed,
    is_main,
    main_says,
    rank,
    world_size,
)
from tdcompress.train.loop import MetricsLog, evaluate, read_metrics

if TYPE_CHECKING:
    from tdcompress.export import ExportResult

__all__ = ["Pipeline", "STAGES"]

# the helpers marked "re-exported" above stay importable from here, as before the split into
# modules

STAGES = ("train", "plan", "admm", "decompose", "finetune", "evaluate", "report")
#: the run's models ``export`` writes (file stem -> the stage that writes it)
EXPORT_WEIGHTS = {"finetuned": "finetune", "decomposed": "decompose", "dense": "train"}


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return default_device()
    return torch.device(spec)


class Pipeline(RunFolder, TrainingPhase):
    """Runs the stages of one :class:`~tdcompress.config.Config`; see the module docstring.

    The run folder (state, lock, config guard, reuse, kept copy) is
    :class:`~tdcompress.pipeline.runfolder.RunFolder`'s; the per-epoch training phase
    :class:`~tdcompress.pipeline.phase.TrainingPhase`'s; the stages, models and export are
    here."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        init_distributed()
        self.device = _device(cfg.runtime.device)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.out = Path(cfg.runtime.out_dir)
        self.keep = Path(cfg.runtime.keep_dir) if cfg.runtime.keep_dir else None
        self._restore_kept()
        barrier()
        self._check_config_unchanged()  # early; again under the run lock, which writes it
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self._data: tuple[Any, Any, dict[str, Any]] | None = None

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
        if self.cfg.runtime.execution != "factorized":
            set_model_execution(model, self.cfg.runtime.execution)
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
            init = self.cfg.model.init_checkpoint
            if init:  # (a resumed phase then loads its own checkpoint over these weights)
                path = Path(init)
                if not main_says(path.is_file(), self.device):
                    raise FileNotFoundError(
                        f"model.init_checkpoint {init!r} does not exist: train that model "
                        "first or unset it"
                    )
                self._load_dense_checkpoint(model, path, key="model.init_checkpoint")
            self._train_phase("dense", model, self.cfg.dense)
        self._mark_done("train", {"test_acc": self._keep_dense(model), "params": _params(model)})

    def _load_dense_checkpoint(
        self, model: nn.Module, path: Path, key: str = "runtime.dense_checkpoint"
    ) -> nn.Module:
        """``model`` holding the weights of the dense checkpoint ``path`` (a training
        checkpoint or a bare state dict); ``key``: the setting that named it, for errors."""
        st = load_checkpoint(path, map_location=self.device)
        try:
            model.load_state_dict(st.get("model", st))
        except RuntimeError as e:  # (another architecture: missing, unexpected or other shapes)
            raise ValueError(
                f"{key} {str(path)!r} does not fit model "
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
        if self.cfg.data.final_test:
            result["test"] = self._final_test()
        self._mark_done("evaluate", result)
        return result

    def _final_test(self) -> dict[str, Any]:
        """Test-set accuracy of the run's dense (``dense.pt``) and fine-tuned models
        (``data.final_test``), whatever ``data.validation`` holds out: the one test
        measurement of a final run whose settings were chosen on validation."""
        test = self.data()[1]
        if self.cfg.data.validation:
            from tdcompress.data import make_loaders

            test = make_loaders(
                dataclasses.replace(self.cfg.data, validation=0),
                device=self.device,
                seed=self.cfg.seed,
                rank=rank(),
                world_size=world_size(),
                channels_last=self.cfg.runtime.channels_last,
            )[1]
        out: dict[str, Any] = {"dense_acc": None, "finetuned_acc": None}
        if (self.out / "dense.pt").exists():
            dense = self._dense_from("dense.pt")
            out["dense_acc"] = evaluate(dense, test, device=self.device)["acc"]
        if (self.out / "finetuned.pt").exists():
            model = self.compressed_model("finetuned.pt")
            out["finetuned_acc"] = evaluate(model, test, device=self.device)["acc"]
        return out

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
