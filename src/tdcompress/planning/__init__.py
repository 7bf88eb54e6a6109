"""CompressionPlan: which layers are compressed, in which format, at which shapes and ranks.

The plan is the one record of a compression: ADMM, surgery, reports and checkpoints all
read it, and it round-trips through YAML/JSON.

The package: :mod:`~tdcompress.planning.records` (the records and their files),
:mod:`~tdcompress.planning.selection` (which layers, with which shapes and MACs) and
:mod:`~tdcompress.planning.ranks` (the rank solver); :func:`plan` puts them together.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from torch import nn

from tdcompress.formats import get_format
from tdcompress.planning.ranks import (
    RATIO_TOLERANCE,
    _additive_search,  # noqa: F401 (re-exported)
    _cap_macs,
    _capped_solve,
    _equal_rank_start,  # noqa: F401 (re-exported)
    _equal_ratio_start,  # noqa: F401 (re-exported)
    _solve,  # noqa: F401 (re-exported)
)
from tdcompress.planning.records import (
    _OLD_META_KEYS,  # noqa: F401 (re-exported)
    _TARGET_META,  # noqa: F401 (re-exported)
    CompressionPlan,
    LayerPlan,
)
from tdcompress.planning.selection import (
    _MHA_IN_PROJ,  # noqa: F401 (re-exported)
    _MHA_OUT_PROJ,  # noqa: F401 (re-exported)
    _candidates,
    _default_selection,
    _example,  # noqa: F401 (re-exported)
    _is_conv1d,
    _linear_like,  # noqa: F401 (re-exported)
    _match,
    _own_forward,  # noqa: F401 (re-exported)
    _trace_shapes,
)

__all__ = ["LayerPlan", "CompressionPlan", "plan", "RATIO_TOLERANCE"]

# the private helpers marked "re-exported" above stay importable from here, as before the
# split into modules

#: how a solved target is shared among layers (see :func:`plan`)
ALLOCATIONS = ("equal_rank", "equal_ratio")


#: plan()'s arguments that the compress section of a config (``CompressConfig``) sets, with
#: their defaults
_CONFIG_ARGS: dict[str, Any] = {
    "format": None,
    "ranks": None,
    "target_ratio": None,
    "target_macs_reduction": None,
    "include": None,
    "exclude": (),
    "lstm": False,
    "layout": None,
    "allocation": "equal_rank",
    "overrides": None,
}


def _config_args(config: Any) -> dict[str, Any]:
    """plan()'s arguments from the compress section of a config: a ``CompressConfig`` or its
    dict (missing keys take the ``CompressConfig`` defaults; ``init`` is decompose()'s)."""
    from tdcompress.config import CompressConfig

    if isinstance(config, Mapping):
        allowed = {f.name for f in fields(CompressConfig)}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(
                f"unknown compress config keys {unknown}; allowed keys are {sorted(allowed)}"
            )
        config = CompressConfig(**config)
    if not isinstance(config, CompressConfig):
        raise TypeError(
            f"config must be a CompressConfig or a mapping of its fields, got "
            f"{type(config).__name__}"
        )
    args = {k: getattr(config, k) for k in _CONFIG_ARGS}
    args["overrides"] = args["overrides"] or None
    return args


def plan(
    model: nn.Module,
    format: str | None = None,
    *,
    config: Any = None,
    ranks: int | Sequence[int] | Mapping[str, int | Sequence[int]] | None = None,
    target_ratio: float | None = None,
    target_macs_reduction: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    lstm: bool = False,
    layout: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    input_shape: Sequence[int] | None = None,
    allocation: str = "equal_rank",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    example_inputs: Any = None,
    max_layer_macs: float | None = None,
) -> CompressionPlan:
    """Plan the compression of ``model`` in ``format`` (default ``"tt"``).

    ``config``: the compress section of a config (a :class:`~tdcompress.config.CompressConfig`
    or its dict, as ``cfg.compress`` of :func:`~tdcompress.config.load_config`) instead of
    the arguments it sets (``format``, ``ranks``, the targets, ``include``, ``exclude``,
    ``lstm``, ``layout``, ``allocation``, ``overrides``), which must then be left out; the
    others (``input_shape``, ``example_inputs``, ``filter_fn``, ``max_layer_macs``) still
    apply. The pipeline plans this way.

    Selection: with ``include=None`` the paper's default (every Conv2d larger than 1x1 and
    every Linear except the first conv and the last Linear; LSTM input-to-hidden matrices,
    named ``"<lstm>.l<k>"``, if ``lstm=True``); otherwise the Conv2d/Linear (and LSTM) layers
    whose names match a glob in ``include``. ``exclude`` globs remove layers either way.
    Every ``include`` pattern must match at least one layer. Subclasses of nn.Linear and
    nn.Conv2d count, and so does Hugging Face's ``Conv1D`` (GPT-2; a Linear stored
    transposed). Weights that no format can take are left dense and listed with the reason
    in ``CompressionPlan.skipped`` (and the summary): grouped convolutions, weights tied to
    another module's, nn.MultiheadAttention's packed input projection (a bare parameter)
    and its ``out_proj`` (read as a bare weight by the attention, never called).

    Ranks: exactly one of ``ranks`` (an int for every bond of every layer, a per-bond list
    for every layer, or a mapping from layer-name glob to either), ``target_ratio``
    (whole-model parameter ratio, dense / compressed) or ``target_macs_reduction`` (needs
    ``input_shape``). Solved targets use equal ranks inside a layer and must be met within
    3% (near the allocation's start first, then any combination of far ranks), else a
    ValueError names the closest value found. ``allocation`` says how a
    target is shared among layers: ``"equal_rank"`` (the paper's: about the same rank in
    every layer, so narrow layers keep most of their size and wide ones lose most) or
    ``"equal_ratio"`` (every layer shrunk by about the same factor in parameters, or in
    MACs for a MAC target; as nearly as whole ranks allow within the 3%: small layers
    have coarse rank steps).

    ``filter_fn(module, name) -> bool`` (as torchao's ``quantize_``), if given, keeps only
    the layers so selected that it accepts (an LSTM's matrices: the ``nn.LSTM`` and
    ``"<lstm>.l<k>"``); with ``include=["*"]`` it alone decides.

    ``overrides`` maps a layer name to spec fields (``format``, ``ranks``, ``out_factors``,
    ``in_factors``, ``layout``). ``input_shape`` (e.g. ``(1, 3, 32, 32)``; a float tensor of
    zeros) or ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs, e.g. ``{"input_ids": ids}``; give a batch of one) enables MAC counts: those of
    one forward pass on that input.

    ``max_layer_macs``: a ceiling on each planned layer's MACs, as a multiple of its dense
    layer's (1.0: no layer may cost more than the dense one; at small batches a TT layer at
    a high rank can cost several times as much). A layer above it gets the largest cap on
    its ranks that meets it (recorded in ``meta["macs_capped"]``); needs MAC counts.
    """
    if config is not None:
        given = dict(
            format=format,
            ranks=ranks,
            target_ratio=target_ratio,
            target_macs_reduction=target_macs_reduction,
            include=include,
            exclude=exclude,
            lstm=lstm,
            layout=layout,
            allocation=allocation,
            overrides=overrides,
        )
        clash = [
            k
            for k, v in given.items()
            if not (
                v is _CONFIG_ARGS[k]
                or (k in ("exclude", "overrides") and not v)
                or v == _CONFIG_ARGS[k]
            )
        ]
        if clash:
            raise ValueError(
                f"give {clash} either in config or as arguments, not both (config sets "
                f"{list(_CONFIG_ARGS)})"
            )
        return plan(
            model,
            **_config_args(config),
            input_shape=input_shape,
            filter_fn=filter_fn,
            example_inputs=example_inputs,
            max_layer_macs=max_layer_macs,
        )
    if format is None:
        format = "tt"
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    get_format(format)  # validates the name
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if ranks is not None and allocation != "equal_rank":
        raise ValueError(
            f"allocation={allocation!r} shares a target_ratio or target_macs_reduction among "
            "layers; with explicit ranks leave it at 'equal_rank'"
        )
    given = [v is not None for v in (ranks, target_ratio, target_macs_reduction)]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of ranks, target_ratio or target_macs_reduction "
            f"(got ranks={ranks!r}, target_ratio={target_ratio!r}, "
            f"target_macs_reduction={target_macs_reduction!r})"
        )
    if max_layer_macs is not None and not (
        isinstance(max_layer_macs, (int, float))
        and math.isfinite(max_layer_macs)
        and max_layer_macs > 0
    ):
        raise ValueError(
            f"max_layer_macs must be a finite number > 0 (a multiple of each layer's dense "
            f"MACs, e.g. 1.0), got {max_layer_macs!r}"
        )
    overrides = dict(overrides or {})
    cands, skipped, linears = _candidates(
        model, lstm or bool(include and any(".l" in p for p in include))
    )
    names = [c[0] for c in cands]
    if include is None:
        chosen = _default_selection(cands, linears)
        if not lstm:
            chosen = [c for c in chosen if type(c[2]) is not nn.LSTM]
    else:
        if isinstance(include, str):
            include = [include]
        for p in include:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                hit = {n: why for n, why in skipped.items() if fnmatch.fnmatchcase(n, p)}
                if hit:
                    raise ValueError(
                        f"include pattern {p!r} matches only weights that cannot be "
                        "compressed: " + "; ".join(f"{n}: {why}" for n, why in hit.items())
                    )
                raise ValueError(
                    f"include pattern {p!r} matches no Conv2d/Linear/LSTM layer; layers are {names}"
                )
        chosen = [c for c in cands if _match(c[0], include)]
    if isinstance(exclude, str):
        exclude = [exclude]
    chosen = [c for c in chosen if not _match(c[0], exclude)]
    if filter_fn is not None:
        if not callable(filter_fn):
            raise TypeError(
                f"filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}"
            )
        chosen = [c for c in chosen if filter_fn(c[2], c[0])]
    for n in overrides:
        if n not in {c[0] for c in chosen}:
            raise ValueError(
                f"overrides name {n!r}, which is not a planned layer; "
                f"planned: {[c[0] for c in chosen]}"
            )
    if not chosen:
        why = "".join(f"; {n} is not compressible: {r}" for n, r in skipped.items())
        raise ValueError(f"no layer selected for compression; layers are {names}{why}")
    if any(c[0] == "" or c[0].startswith(".") for c in chosen):
        raise ValueError(
            f"the model is itself a {type(model).__name__}: layers are replaced inside a "
            "parent module, so wrap it (e.g. nn.Sequential(model)) and plan that"
        )

    shapes = _trace_shapes(model, input_shape, example_inputs)
    model_params = sum(p.numel() for p in model.parameters())
    model_macs = shapes.get("__macs__")
    capped: dict[str, list[int]] = {}

    def make(rank_for: Callable[[str], Any]) -> CompressionPlan:
        layers = []
        for name, param, mod, geo in chosen:
            ov = dict(overrides.get(name, {}))
            fmt = get_format(ov.pop("format", format))
            r = ov.pop("ranks", None) or rank_for(name)
            spec = fmt.resolve(
                geo,
                r,
                out_factors=_tuple(ov.pop("out_factors", None)),
                in_factors=_tuple(ov.pop("in_factors", None)),
                layout=ov.pop("layout", layout),
                layer_name=name,
            )
            if ov:
                raise ValueError(f"overrides[{name!r}] has unknown keys {sorted(ov)}")
            hw, steps = None, 1
            info = shapes.get(name.rsplit(".l", 1)[0] if type(mod) is nn.LSTM else name)
            if info and info[0] == "conv":
                hw, steps = info[1], info[3]
            elif info and info[0] in ("lstm", "linear"):
                steps = info[1]
            lp = LayerPlan(name, param, geo, spec, hw, steps, transposed=_is_conv1d(mod))
            if max_layer_macs is not None:
                lp = _cap_macs(lp, float(max_layer_macs), capped)
            layers.append(lp)
        return CompressionPlan(layers, model_params, model_macs, skipped=dict(skipped))

    def finish(p: CompressionPlan) -> CompressionPlan:
        if max_layer_macs is not None:
            p.meta["max_layer_macs"] = float(max_layer_macs)
            kept = {lp.name: list(lp.spec.ranks) for lp in p}
            hits = {n: r for n, r in capped.items() if n in kept and r == kept[n]}
            if hits:
                p.meta["macs_capped"] = hits
        return p

    if ranks is not None:
        if isinstance(ranks, Mapping):
            rmap = dict(ranks)

            def rank_for(name: str) -> Any:
                for pat, r in rmap.items():
                    if fnmatch.fnmatchcase(name, pat):
                        return r
                raise ValueError(
                    f"ranks has no entry matching layer {name!r}; patterns: {list(rmap)}"
                )

            return finish(make(rank_for))
        return finish(make(lambda name: ranks))

    if target_ratio is not None:
        return finish(
            _capped_solve(
                max_layer_macs,
                make,
                chosen,
                float(target_ratio),
                "ratio",
                lambda p: p.ratio,
                allocation,
                lambda lp: (lp.params, lp.dense_params),
            )
        )
    if input_shape is None and example_inputs is None:
        raise ValueError("target_macs_reduction needs input_shape or example_inputs to count MACs")
    unseen = [lp.name for lp in make(lambda name: 1) if lp.macs is None]
    if unseen:
        raise ValueError(
            f"target_macs_reduction needs the MACs of every planned layer, but {unseen} saw "
            f"no input when the model ran on "
            f"{'example_inputs' if input_shape is None else f'input_shape {tuple(input_shape)}'}"
            "; exclude them "
            "or give target_ratio"
        )
    return finish(
        _capped_solve(
            max_layer_macs,
            make,
            chosen,
            float(target_macs_reduction),
            "MAC reduction",
            lambda p: p.macs_reduction,
            allocation,
            lambda lp: (lp.macs, lp.dense_macs),
        )
    )


def _tuple(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(a) for a in v)
