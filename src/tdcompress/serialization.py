"""Save and load compressed models: the file says what it holds.

Every factorized layer keeps a record of itself in its state dict (``<name>._extra_state``:
class, format spec, geometry; :meth:`tdcompress.layers._base.FactorizedLayer.get_extra_state`),
and so does :class:`~tdcompress.layers.FactorizedLSTM`. :func:`save_compressed` writes the
state dict (and optionally the plan) atomically; :func:`load_compressed` takes the dense
architecture, swaps the recorded layer names for factorized layers built straight from their
records (parameters left uninitialised, nothing decomposed) and loads the weights. Files
written before the layers kept records (a run folder's ``decomposed.pt``/``finetuned.pt`` of
an older tdcompress) load with the plan they were made with.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdcompress.formats.base import FactorSpec, LayerGeometry
from tdcompress.layers._base import (
    RECORD_KEY,
    check_record,
    no_init,
    structural_spec,
)
from tdcompress.planning import CompressionPlan, _is_conv1d
from tdcompress.surgery import _parent
from tdcompress.wrappers import unwrap_model

__all__ = [
    "save_compressed",
    "load_compressed",
    "read_state",
    "layer_records",
    "load_model_state",
    "FILE_VERSION",
]

#: version of the files :func:`save_compressed` writes
FILE_VERSION = 1
_EXTRA = "_extra_state"

ModelOrFactory = nn.Module | Callable[[], nn.Module]


def _layer_classes() -> dict[str, type[nn.Module]]:
    """The factorized module classes a record may name (those registered by the layers)."""
    import tdcompress.layers  # noqa: F401  (registers the layer classes)
    from tdcompress.layers.registry import layer_classes

    return layer_classes()


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    plan: CompressionPlan | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict (its factorized layers' records included) to ``path``,
    atomically (temporary file, fsync, rename), with ``plan`` and ``meta`` (JSON-able) if
    given. The file reads with ``torch.load(path, weights_only=True)``: ``{"model": state
    dict, "tdcompress": {"version", "meta"}, "plan": dict or None}``. Returns the path."""
    from tdcompress.train.checkpoint import save_checkpoint

    model = unwrap_model(model)  # DDP / DataParallel / torch.compile wrappers
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan or None, got {type(plan).__name__}")
    sd = model.state_dict()
    if not layer_records(sd):
        raise ValueError(
            f"{type(model).__name__} has no factorized layer to record; save a dense model "
            "with torch.save(model.state_dict(), path)"
        )
    path = Path(path)
    save_checkpoint(
        path,
        {
            "model": sd,
            "tdcompress": {"version": FILE_VERSION, "meta": dict(meta or {})},
            "plan": None if plan is None else plan.to_dict(),
        },
    )
    return path


def read_state(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; a missing file raises FileNotFoundError and
    an unreadable one (truncated, not a PyTorch file, or holding arbitrary objects) a
    ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a saved compressed model)")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: not a readable PyTorch file ({first}); it may be truncated or corrupt: "
            "write it again"
        ) from None
    if not isinstance(st, dict):
        raise ValueError(f"{path}: holds a {type(st).__name__}, not a state dict")
    return st


def layer_records(state_dict: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The factorized layers' records in a state dict: module name -> record."""
    out = {}
    for key, v in state_dict.items():
        if key.endswith(_EXTRA) and isinstance(v, Mapping) and RECORD_KEY in v:
            name = key[: -len(_EXTRA)].rstrip(".")
            out[name] = check_record(v, key, ("class",))
    return out


def load_compressed(
    path: str | os.PathLike[str],
    model: ModelOrFactory,
    *,
    plan: CompressionPlan | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
) -> nn.Module:
    """The compressed model saved in ``path``, rebuilt inside ``model`` and returned.

    ``model``: the dense architecture (or a callable returning it), changed in place: each
    layer the file records as factorized is replaced by that factorized layer, built from
    the record with uninitialised parameters (nothing decomposed, nothing drawn at random;
    on the device and dtype of the layer it replaces), then every weight is loaded
    (``strict`` as in ``load_state_dict``). Layers of ``model`` that are already the
    recorded factorized layers are kept (their records are checked on loading). A file of
    an older tdcompress, without records, needs ``plan`` (or the plan saved in it).
    A layer whose dense shape differs from the record raises ValueError naming it.
    """
    st = read_state(path, map_location)
    sd = st.get("model", st)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: its 'model' entry is a {type(sd).__name__}, not a state dict")
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(
                f"model must be an nn.Module or a callable returning one, got {model!r}"
            )
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the model factory returned a {type(model).__name__}, not an nn.Module"
            )
    records = layer_records(sd)
    if records:
        model = _build_from_records(model, records, sd, str(path))
    else:
        if plan is None and isinstance(st.get("plan"), Mapping):
            plan = CompressionPlan.from_dict(st["plan"])
        if plan is None:
            raise ValueError(
                f"{path}: holds no factorized-layer records (written by an older tdcompress, "
                "or not a compressed model): pass the plan it was made with (plan=...)"
            )
        _build_from_plan(model, plan)
    try:
        load_model_state(model, sd, strict=strict)
    except (RuntimeError, ValueError) as e:  # (ValueError: a record naming its layer)
        raise ValueError(f"{path}: does not fit the model: {e}") from None
    return model


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """``model.load_state_dict(state_dict, strict)``; a factorized layer missing from
    ``state_dict``'s records (a state dict of an older tdcompress) keeps its own record (the
    layers' ``_load_from_state_dict`` does it, so plain ``load_state_dict`` does too)."""
    return model.load_state_dict(state_dict, strict=strict)


def _build_from_plan(model: nn.Module, plan: CompressionPlan) -> None:
    from tdcompress.surgery import _replace_layers

    if all(lp.param not in dict(model.named_parameters()) for lp in plan):
        return  # (already built: load_state_dict checks the layers)
    plan.check_model(model)
    with no_init(), torch.no_grad():
        _replace_layers(model, plan, None, "random")  # (random: nothing decomposed)


def _build_from_records(
    model: nn.Module, records: Mapping[str, Mapping[str, Any]], sd: Mapping[str, Any], src: str
) -> nn.Module:
    classes = _layer_classes()
    for name, rec in records.items():
        if rec["class"] not in classes:
            raise ValueError(
                f"{src}: layer {name!r} is a {rec['class']!r}, which this tdcompress cannot "
                f"build; it builds {sorted(classes)}"
            )
    lstms = [n for n, r in records.items() if r["class"] == "FactorizedLSTM"]
    swaps: list[tuple[str, nn.Module]] = []
    for name, rec in records.items():
        if any(name.startswith(f"{lstm}.") for lstm in lstms if lstm != name):
            continue  # an LSTM's input layer: built with its LSTM
        if name:
            try:
                current = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"{src}: the model has no layer {name!r}, which the file holds as a "
                    f"{rec['class']}; pass the architecture the file was saved from"
                ) from None
        else:
            current = model
        if type(current).__name__ == rec["class"]:
            continue  # already factorized: load_state_dict checks its record
        where = f"{src}: layer {name!r}"
        if rec["class"] == "FactorizedLSTM":
            new = _lstm_from_record(current, rec, name, records, sd, where)
        else:
            new = _layer_from_record(current, rec, where)
        new.train(current.training)
        swaps.append((name, new))
    for name, new in swaps:  # (after every layer was built and checked)
        if not name:
            model = new
        else:
            parent, attr = _parent(model, name)
            setattr(parent, attr, new)
    return model


def _like(current: nn.Module) -> dict[str, Any]:
    p = next(current.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _layer_from_record(current: nn.Module | None, rec: Mapping[str, Any], where: str) -> nn.Module:
    rec = check_record(rec, where, ("class", "geometry", "spec"))
    cls = _layer_classes()[rec["class"]]
    geometry = LayerGeometry.from_dict(dict(rec["geometry"]))
    spec = FactorSpec.from_dict(dict(rec["spec"]))
    if current is not None:
        try:
            if _is_conv1d(current):  # GPT-2's Conv1D: a Linear stored transposed
                have = LayerGeometry.linear(current.nx, current.nf, bias=current.bias is not None)
            else:
                have = LayerGeometry.from_module(current)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{where}: the file holds a {rec['class']} in place of an nn.Linear or "
                f"nn.Conv2d, but the model's layer cannot be one ({e})"
            ) from None
        if have != geometry:
            raise ValueError(
                f"{where}: the model's layer is {have.to_dict()}, the file's {rec['class']} "
                f"replaces {geometry.to_dict()}; pass the architecture the file was saved from"
            )
    kw = _like(current) if current is not None else {}
    with no_init():
        layer = cls._from_spec(geometry, spec, **kw)  # type: ignore[attr-defined]
    if structural_spec(layer.spec) != structural_spec(spec):  # (resolved otherwise here)
        raise ValueError(
            f"{where}: the recorded {rec['class']} spec {spec.to_dict()} resolves to "
            f"{layer.spec.to_dict()} here; the file does not describe a layer this "
            "tdcompress builds"
        )
    layer.spec = spec  # (with the recorded options)
    return layer


def _lstm_from_record(
    current: nn.Module,
    rec: Mapping[str, Any],
    name: str,
    records: Mapping[str, Mapping[str, Any]],
    sd: Mapping[str, Any],
    where: str,
) -> nn.Module:
    from torch.nn.utils import skip_init

    from tdcompress.layers.lstm import FactorizedLSTM

    keys = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout")
    rec = check_record(rec, where, ("class", *keys))
    cfg = {k: rec[k] for k in keys}
    if not isinstance(current, nn.LSTM):
        raise ValueError(
            f"{where}: the file holds a FactorizedLSTM, the model has a "
            f"{type(current).__name__} there; pass the architecture the file was saved from"
        )
    have = {k: getattr(current, k) for k in keys}
    if have != cfg or current.proj_size or current.bidirectional:
        raise ValueError(
            f"{where}: the model's nn.LSTM has {have} (proj_size={current.proj_size}, "
            f"bidirectional={current.bidirectional}), the file's FactorizedLSTM {cfg}"
        )
    kw = _like(current)
    H = cfg["hidden_size"]
    inputs: list[nn.Module | None] = []
    for k in range(cfg["num_layers"]):
        sub = f"{name}.input_layers.{k}" if name else f"input_layers.{k}"
        in_k = cfg["input_size"] if k == 0 else H
        if sub in records:
            layer = _layer_from_record(None, records[sub], f"{where}.input_layers.{k}")
            g = layer.geometry
            if (g.kind, g.in_features, g.out_features) != ("linear", in_k, 4 * H):
                raise ValueError(
                    f"{where}.input_layers.{k}: a {g.kind} {g.in_features} -> {g.out_features}, "
                    f"but layer {k} of the LSTM needs a linear {in_k} -> {4 * H}"
                )
            inputs.append(layer.to(**kw))
        elif f"{sub}.bias" in sd:  # a dense input layer with its own bias
            inputs.append(skip_init(nn.Linear, in_k, 4 * H, **kw))
        else:
            inputs.append(None)  # the default dense input layer (as from_lstm makes)
    with no_init():
        return FactorizedLSTM(**cfg, input_layers=inputs, **kw)
