"""Experiment configuration: typed sections, strict keys, YAML files and ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PhaseConfig",
    "CompressConfig",
    "ADMMConfig",
    "RuntimeConfig",
    "load_config",
    "apply_overrides",
]


@dataclass
class DataConfig:
    dataset: str = "digits"  # mnist | fashion_mnist | cifar10 | cifar100 | fsdd | digits
    root: str | None = None  # data root; the CLI's --data-root overrides it
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: bool = False  # random crop (crop_padding) + horizontal flip
    crop_padding: int = 4
    flip: bool = True
    normalize: bool = True
    train_subset: int | None = None  # first N training samples (smoke runs)
    # N > 0: hold N training samples out (a fixed draw, the same for every seed and method)
    # and evaluate on them instead of the test set: for choosing hyperparameters
    validation: int = 0
    # the evaluate stage also measures the dense and fine-tuned models on the test set (its
    # record's "test"): the final runs of a study tuned on data.validation. It changes no
    # training, so it may be switched on for a finished run folder (`tdcompress evaluate`)
    final_test: bool = False
    download: bool = False
    # fsdd only: "official" split (recording index 0-4 test) or "speaker" (leave `speaker` out)
    protocol: str = "official"
    speaker: str | None = None


@dataclass
class ModelConfig:
    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # dense weights the dense phase starts from (a warm start: e.g. a trained model trained
    # for more epochs; the optimizer and its schedule start afresh); null: random init
    init_checkpoint: str | None = None


#: the optimizers and learning-rate schedules an OptimConfig may name
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class PhaseConfig:
    epochs: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    # knowledge distillation from the run's dense model (ADMM and fine-tune phases only):
    # loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher_T || student_T)
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    # cross-entropy against (1 - e) one-hot + e uniform targets (Szegedy et al.; the
    # authors' public code trains its CIFAR models with e = 0.1); 0 = plain cross-entropy
    label_smoothing: float = 0.0


@dataclass
class CompressConfig:
    format: str = "tt"
    ranks: Any = None  # int, per-bond list, or {layer glob: rank}
    target_ratio: float | None = None
    target_macs_reduction: float | None = None
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    lstm: bool = False
    layout: str | None = None
    allocation: str = "equal_rank"  # how a target is shared among layers: equal_rank | equal_ratio
    overrides: dict[str, Any] = field(default_factory=dict)
    # decompose: factors from the (ADMM-trained) dense weights; random: the same factorized
    # architecture at random initialisation ("from scratch"; set admm.epochs to 0)
    init: str = "decompose"


@dataclass
class ADMMConfig(PhaseConfig):
    rho: float = 1e-3
    every_steps: int | None = None  # None: once per epoch (the paper)
    rho_growth: float = 1.0
    rho_max: float = 1e9
    mode: str = "penalty"  # penalty | hook


@dataclass
class RuntimeConfig:
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str | None = None  # None | bf16 | fp16
    channels_last: bool = False
    threads: int | None = None
    progress: bool = True
    dense_checkpoint: str | None = None  # load dense weights instead of training them
    # torch.compile the training forward: true (inductor), false, or a torch.compile backend
    # name; the factorized layers' plans are warmed first, so the graph has no break
    compile: bool | str = False
    # a second folder (e.g. committed under benchmarks/checkpoints/) that mirrors the run's
    # resumable state after every epoch; an empty out_dir starts from it (train/keep.py)
    keep_dir: str | None = None
    # how the factorized layers run in the fine-tuning (and evaluation) of the compressed
    # model: "factorized" (their contraction) or "rebuilt" (one dense op on the kernel
    # rebuilt from the cores in every step; the same function and gradients, often faster
    # at training batch sizes: tdcompress.layers.set_model_execution)
    execution: str = "factorized"


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dense: PhaseConfig = field(default_factory=PhaseConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    admm: ADMMConfig = field(default_factory=ADMMConfig)
    finetune: PhaseConfig = field(default_factory=PhaseConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"config section {path or '<root>'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or "the top level"
        raise ValueError(
            f"unknown config keys {unknown} in {where}; valid keys are {sorted(names)}"
        )
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{path}.{k}" if path else k)
        else:
            kwargs[k] = _coerce(t, v, f"{path}.{k}" if path else k)
    return cls(**kwargs)


def _coerce(t: Any, v: Any, path: str) -> Any:
    """Type checking for scalars: ints given where floats are expected are fine, and so are
    strings that read as numbers (YAML 1.1 reads ``5e-3``, without a dot, as a string);
    ``X | None`` checks ``X``."""
    if v is None:
        return v
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        t = args[0]  # X | None
    if t is float:
        return _number(v, path)
    if typing.get_origin(t) is list and typing.get_args(t) == (float,):
        if not isinstance(v, list):
            raise ValueError(f"config {path} must be a list of numbers, got {v!r}")
        return [_number(x, f"{path}[{i}]") for i, x in enumerate(v)]
    if t is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"config {path} must be an int, got {v!r}")
    if t is bool and not isinstance(v, bool):
        raise ValueError(f"config {path} must be true or false, got {v!r}")
    if t is str and not isinstance(v, str):
        raise ValueError(f"config {path} must be a string, got {v!r}")
    return v


def _number(v: Any, path: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise ValueError(f"config {path} must be a number, got {v!r}")


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (line and column, 1-based)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path``; an unreadable file raises ValueError naming it and ``what`` it
    is (e.g. "this run's stage record")."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}), so {what} cannot be read; the file is corrupt: "
            "restore it or start a fresh run folder"
        ) from None


def apply_overrides(d: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set expects key=value, got {s!r}")
        key, raw = s.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(
                f"--set {s}: the value is not valid YAML ({yaml_problem(e)}); quote it"
            ) from None
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return d


def load_config(path: str | Path | None = None, sets: list[str] | None = None) -> Config:
    """A :class:`Config` from a YAML file (or the defaults) plus ``--set`` overrides;
    unknown keys are rejected with the list of valid ones."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"config file {p} does not exist; give the path of an experiment YAML "
                "(examples: configs/ in the repository)"
            )
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(
                f"config file {p} is not valid YAML: {yaml_problem(e)}; fix the file"
            ) from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
    d = apply_overrides(d, list(sets or []))
    cfg = _build(Config, d, "")
    _check_choices(cfg)
    return cfg


def _choices() -> dict[tuple[str, str], tuple[Any, ...]]:
    """The allowed values of the config's fixed-choice keys, each read from the one place
    that defines it (imported here, as the data and format checks do: this module imports
    no torch)."""
    from tdcompress.admm import MODES
    from tdcompress.layers import EXECUTION_MODES
    from tdcompress.planning import ALLOCATIONS
    from tdcompress.surgery import INITS
    from tdcompress.train.loop import AMP_MODES

    return {
        ("compress", "init"): INITS,
        ("compress", "allocation"): ALLOCATIONS,
        ("admm", "mode"): MODES,
        ("runtime", "amp"): AMP_MODES,
        ("runtime", "execution"): EXECUTION_MODES,
    }


def _check_ranges(cfg: Config) -> None:
    """Choices, signs and ranges that would otherwise fail (or quietly misbehave) only when
    their stage runs, hours into a run."""

    def need(ok: bool, key: str, v: Any, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{key} must be {allowed}, got {v!r}")

    from tdcompress.data import DATASETS
    from tdcompress.formats import available_formats

    need(
        cfg.data.dataset in DATASETS, "data.dataset", cfg.data.dataset, f"one of {sorted(DATASETS)}"
    )

    fmts = available_formats()
    need(cfg.compress.format in fmts, "compress.format", cfg.compress.format, f"one of {fmts}")
    for k, v in (cfg.compress.overrides or {}).items():
        f = v.get("format") if isinstance(v, dict) else None
        need(f is None or f in fmts, f"compress.overrides[{k!r}].format", f, f"one of {fmts}")
    given = [
        k
        for k in ("ranks", "target_ratio", "target_macs_reduction")
        if getattr(cfg.compress, k) is not None
    ]
    need(
        len(given) <= 1,
        "compress",
        given,
        "given at most one of ranks, target_ratio, target_macs_reduction",
    )
    for k in ("target_ratio", "target_macs_reduction"):
        v = getattr(cfg.compress, k)
        need(v is None or v > 1, f"compress.{k}", v, "a number > 1")
    d = cfg.data
    for k in ("batch_size", "eval_batch_size"):
        need(getattr(d, k) >= 1, f"data.{k}", getattr(d, k), "an int >= 1")
    need(
        d.train_subset is None or d.train_subset >= 1,
        "data.train_subset",
        d.train_subset,
        "null or an int >= 1",
    )
    need(d.crop_padding >= 0, "data.crop_padding", d.crop_padding, "an int >= 0")
    need(d.validation >= 0, "data.validation", d.validation, "an int >= 0 (0: the test set)")
    from tdcompress.data.speech import PROTOCOLS, SPEAKERS

    need(d.protocol in PROTOCOLS, "data.protocol", d.protocol, f"one of {list(PROTOCOLS)}")
    if d.dataset == "fsdd":
        need(not d.augment, "data.augment", d.augment, "false for fsdd (no augmentation)")
        if d.protocol == "speaker":
            need(d.speaker in SPEAKERS, "data.speaker", d.speaker, f"one of {list(SPEAKERS)}")
        else:
            need(d.speaker is None, "data.speaker", d.speaker, "null with data.protocol official")
    else:
        need(
            d.protocol == "official" and d.speaker is None,
            "data.protocol / data.speaker",
            (d.protocol, d.speaker),
            "'official' / null: protocols and speakers are for data.dataset fsdd",
        )
    for name in ("dense", "admm", "finetune"):
        ph = getattr(cfg, name)
        o = ph.optim
        need(ph.epochs >= 0, f"{name}.epochs", ph.epochs, "an int >= 0")
        need(o.name in OPTIMIZERS, f"{name}.optim.name", o.name, f"one of {list(OPTIMIZERS)}")
        need(
            o.schedule in SCHEDULES,
            f"{name}.optim.schedule",
            o.schedule,
            f"one of {list(SCHEDULES)}",
        )
        need(o.lr >= 0, f"{name}.optim.lr", o.lr, ">= 0")
        need(o.weight_decay >= 0, f"{name}.optim.weight_decay", o.weight_decay, ">= 0")
        need(0 <= o.momentum < 1, f"{name}.optim.momentum", o.momentum, "in [0, 1)")
        need(o.gamma > 0, f"{name}.optim.gamma", o.gamma, "> 0")
        need(o.warmup_epochs >= 0, f"{name}.optim.warmup_epochs", o.warmup_epochs, "an int >= 0")
        need(
            all(0 < m <= 1 for m in o.milestones),
            f"{name}.optim.milestones",
            o.milestones,
            "fractions of the phase's epochs in (0, 1] (0.5 = half-way)",
        )
    a = cfg.admm
    need(a.rho > 0, "admm.rho", a.rho, "> 0")
    need(a.rho_growth >= 1, "admm.rho_growth", a.rho_growth, ">= 1")
    need(a.rho_max >= a.rho, "admm.rho_max", a.rho_max, f">= admm.rho ({a.rho:g})")
    need(
        a.every_steps is None or a.every_steps >= 1,
        "admm.every_steps",
        a.every_steps,
        "null (once per epoch) or an int >= 1",
    )
    t = cfg.runtime.threads
    need(t is None or t >= 1, "runtime.threads", t, "null or an int >= 1")
    # hooks add rho (W - Z + U) to the scaled gradient, which fp16's GradScaler then divides
    # by its scale (~65536): the ADMM term would all but vanish
    need(
        not (a.mode == "hook" and cfg.runtime.amp == "fp16"),
        "admm.mode",
        a.mode,
        "'penalty' with runtime.amp: fp16 (its gradient scaler would shrink the hooks' term)",
    )


def _check_choices(cfg: Config) -> None:
    for (section, key), allowed in _choices().items():
        v = getattr(getattr(cfg, section), key)
        if v not in allowed:
            raise ValueError(f"{section}.{key} must be one of {list(allowed)}, got {v!r}")
    c = cfg.runtime.compile
    if not isinstance(c, bool):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if not isinstance(c, str) or c not in backends:
            raise ValueError(
                f"runtime.compile must be true, false or a torch.compile backend "
                f"(one of {backends}), got {c!r}"
            )
    _check_ranges(cfg)
    for name in ("dense", "admm", "finetune"):
        ph = getattr(cfg, name)
        if not 0.0 <= ph.label_smoothing < 1.0:
            raise ValueError(
                f"{name}.label_smoothing must be in [0, 1), got {ph.label_smoothing!r}"
            )
        if not 0.0 <= ph.distill_weight <= 1.0:
            raise ValueError(f"{name}.distill_weight must be in [0, 1], got {ph.distill_weight!r}")
        if not ph.distill_temperature > 0:
            raise ValueError(
                f"{name}.distill_temperature must be > 0, got {ph.distill_temperature!r}"
            )
    if cfg.dense.distill_weight:
        raise ValueError(
            f"dense.distill_weight must be 0 (the teacher is the dense model itself), "
            f"got {cfg.dense.distill_weight!r}; set admm.distill_weight or finetune.distill_weight"
        )
