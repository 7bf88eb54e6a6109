"""Layer selection: the candidate weights of a model (nn.Linear/nn.Conv2d and their
subclasses, Hugging Face's Conv1D, LSTM input-to-hidden matrices), the weights no format
can take (listed with the reason), the paper's default selection, glob matching, and the
example forward pass that records input shapes and counts dense MACs."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tdcompress.formats import LayerGeometry


def _is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    w = getattr(mod, "weight", None)
    nf, nx = getattr(mod, "nf", None), getattr(mod, "nx", None)
    return (
        type(mod).__name__ == "Conv1D"
        and isinstance(nf, int)
        and isinstance(nx, int)
        and isinstance(w, nn.Parameter)
        and tuple(w.shape) == (nx, nf)
    )


def _linear_like(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _own_forward(mod: nn.Module) -> str | None:
    """The name of the method by which a subclass of nn.Linear / nn.Conv2d computes
    something else than its base (timm's StdConv2d standardises its weight in ``forward``,
    Conv2dSame pads there), or None: a factorized layer in its place would compute the
    base's function, so such layers are left dense."""
    base = nn.Linear if isinstance(mod, nn.Linear) else nn.Conv2d
    if not isinstance(mod, (nn.Linear, nn.Conv2d)) or type(mod) is base:
        return None
    for meth in ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",):
        if getattr(type(mod), meth) is not getattr(base, meth):
            return meth
    return None


#: why nn.MultiheadAttention's projections stay dense
_MHA_IN_PROJ = (
    "the packed q/k/v projection of nn.MultiheadAttention: a bare parameter, no layer to swap"
)
_MHA_OUT_PROJ = (
    "nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: a "
    "factorized one would be rebuilt dense on every call"
)


def _candidates(
    model: nn.Module, lstm: bool
) -> tuple[list[tuple[str, str, nn.Module, LayerGeometry]], dict[str, str], list[str]]:
    """(name, param, module, geometry) for every layer a format can take, in module order
    (subclasses of nn.Linear/nn.Conv2d included); the weights that cannot be taken, with
    the reason; and the names of all Linear-like layers (taken or not), in module order."""
    out = []
    skipped: dict[str, str] = {}
    linears: list[str] = []
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    mha_out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            packed = [
                n
                for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if getattr(mod, n, None) is not None
            ]
            for n in packed:
                skipped[prefix + n] = _MHA_IN_PROJ
            mha_out.add(prefix + "out_proj")
    for name, mod in model.named_modules():
        if _linear_like(mod) or isinstance(mod, nn.Conv2d):
            if _linear_like(mod):
                linears.append(name)
            w = mod.weight
            own = f"{name}.weight" if name else "weight"
            shared = [n for n in owners.get(id(w), []) if n != own]
            if name in mha_out:
                skipped[name] = _MHA_OUT_PROJ
            elif _own_forward(mod):
                skipped[name] = (
                    f"{type(mod).__name__} overrides {_own_forward(mod)}() of "
                    f"{'nn.Linear' if isinstance(mod, nn.Linear) else 'nn.Conv2d'}: a factorized "
                    "layer in its place would not compute it"
                )
            elif isinstance(w, nn.parameter.UninitializedParameter):
                skipped[name] = "a lazy layer not yet initialised: run the model once first"
            elif shared:
                skipped[name] = (
                    f"its weight is shared with {', '.join(shared)} (tied weights): "
                    "factorizing one user would untie them"
                )
            elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
                skipped[name] = (
                    f"grouped convolution (groups={mod.groups}): the formats factor a full "
                    "kernel (groups=1)"
                )
            elif _is_conv1d(mod):
                geo = LayerGeometry.linear(mod.nx, mod.nf, bias=mod.bias is not None)
                out.append((name, f"{name}.weight", mod, geo))
            else:
                try:
                    geo = LayerGeometry.from_module(mod)
                except ValueError as e:  # string padding, other padding modes
                    skipped[name] = str(e)
                    continue
                out.append((name, f"{name}.weight", mod, geo))
        elif lstm and type(mod) is nn.LSTM:
            if mod.proj_size or mod.bidirectional:
                what = "proj_size" if mod.proj_size else "bidirectional"
                skipped[name] = f"an nn.LSTM with {what}: FactorizedLSTM does not support it"
                continue
            for k in range(mod.num_layers):
                w = getattr(mod, f"weight_ih_l{k}")
                geo = LayerGeometry.linear(w.shape[1], w.shape[0], bias=False)
                out.append((f"{name}.l{k}", f"{name}.weight_ih_l{k}", mod, geo))
    return out, skipped, linears


def _default_selection(cands: list, linears: Sequence[str] = ()) -> list:
    """The paper's default: convs larger than 1x1 and Linears, minus the first conv and the
    last Linear (the classifier, even when it is not compressible, e.g. tied to an
    embedding); LSTM input matrices are kept when asked for."""
    convs = [c for c in cands if c[3].kind == "conv2d" and isinstance(c[2], nn.Conv2d)]
    lins = [c[0] for c in cands if _linear_like(c[2])]
    drop = set()
    if convs:
        drop.add(convs[0][0])
    last = list(linears)[-1:] or lins[-1:]
    drop.update(last)
    keep = []
    for c in cands:
        if c[0] in drop:
            continue
        g = c[3]
        if g.kind == "conv2d" and (g.kernel_size == (1, 1) or g.groups != 1):
            continue
        keep.append(c)
    return keep


def _example(
    model: nn.Module, input_shape: Sequence[int] | None, example_inputs: Any
) -> tuple[tuple, dict] | None:
    """(args, kwargs) of the example forward pass, or None without one."""
    if example_inputs is not None:
        if input_shape is not None:
            raise ValueError(
                f"give input_shape or example_inputs, not both (got input_shape="
                f"{tuple(input_shape)!r} and example_inputs of type "
                f"{type(example_inputs).__name__})"
            )
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,), {}
        if isinstance(example_inputs, tuple):
            return example_inputs, {}
        if isinstance(example_inputs, Mapping):
            return (), dict(example_inputs)
        raise TypeError(
            "example_inputs must be a tensor, a tuple of positional inputs or a dict of "
            f"keyword inputs, got {type(example_inputs).__name__}"
        )
    if input_shape is None:
        return None
    p = next(model.parameters(), None)
    x = torch.zeros(
        *input_shape,
        device=p.device if p is not None else None,
        dtype=p.dtype if p is not None and p.is_floating_point() else None,
    )
    return (x,), {}


def _trace_shapes(
    model: nn.Module, input_shape: Sequence[int] | None, example_inputs: Any = None
) -> dict[str, Any]:
    """Input sizes of every Conv2d (hw, and how often it ran) and LSTM (time steps) and the
    rows of every Linear (all positions of the example; nn.Linear subclasses and Hugging
    Face's Conv1D too) from one example forward pass, summed over the calls of a module that
    runs more than once; and the dense MACs of all Conv2d/Linear/LSTM calls (both directions
    of a bidirectional LSTM) and of nn.MultiheadAttention's projections. Convs count per
    sample; Linears every row of the example, so give a batch of one."""
    example = _example(model, input_shape, example_inputs)
    if example is None:
        return {}
    seen: dict[str, Any] = {}
    macs = [0]
    hooks = []

    def hook(name: str) -> Callable:
        def f(mod: nn.Module, args: tuple, out: Any) -> None:
            x, prev = args[0], seen.get(name)
            if isinstance(mod, nn.Conv2d):
                hw = tuple(x.shape[-2:])
                macs[0] += LayerGeometry.from_module(mod).dense_macs(hw)
                # (a shared conv's later calls are counted at its first call's size)
                calls = prev[3] + 1 if prev else 1
                seen[name] = ("conv", prev[1] if prev else hw, tuple(out.shape[-2:]), calls)
            elif isinstance(mod, nn.LSTM):
                t = int(x.shape[1] if mod.batch_first else x.shape[0])
                h, dirs = mod.hidden_size, 2 if mod.bidirectional else 1
                for k in range(mod.num_layers):
                    i = mod.input_size if k == 0 else h * dirs
                    macs[0] += dirs * t * 4 * h * (i + h)
                seen[name] = ("lstm", (prev[1] if prev else 0) + t)
            elif _linear_like(mod):
                n = int(math.prod(x.shape[:-1])) if x.dim() > 1 else 1
                macs[0] += n * int(mod.weight.numel())
                seen[name] = ("linear", (prev[1] if prev else 0) + n)

        return f

    def attention(mod: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> None:
        # the projections run inside F.multi_head_attention_forward, not as module calls
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        rows = [int(t.numel() // t.shape[-1]) for t in (q, k, v)]
        e = mod.embed_dim
        macs[0] += rows[0] * e * e + rows[1] * e * mod.kdim + rows[2] * e * mod.vdim
        macs[0] += rows[0] * e * e  # out_proj

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.LSTM)) or _linear_like(mod):
            hooks.append(mod.register_forward_hook(hook(name)))
        elif isinstance(mod, nn.MultiheadAttention):
            hooks.append(mod.register_forward_hook(attention, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example[0], **example[1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    seen["__macs__"] = macs[0]
    return seen


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
