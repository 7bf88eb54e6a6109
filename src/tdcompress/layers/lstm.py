""":class:`FactorizedLSTM`: an ``nn.LSTM``-compatible LSTM whose input-to-hidden matrices
are arbitrary (factorized) linear modules, as in TT-LSTM (Yang et al. 2017).

Each layer ``k`` maps its whole input sequence through ``input_layers[k]`` (one call on all
``T * B`` rows: ``(.., in_k) -> (.., 4 * hidden_size)``, the four gates sharing one
factorized matrix), adds ``bias_ih_l{k} + bias_hh_l{k}``, then runs the recurrence with the
dense ``weight_hh_l{k}`` (4H, H). Gate order is PyTorch's: input, forget, cell, output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdcompress.layers._base import (
    EXTRA_STATE_VERSION,
    RECORD_KEY,
    FactorizedLayer,
    _compiler_flag,
    _exporting,
    _median,
    batch_key,
    check_record,
    chosen_mode,
    folded_weight,
    init_skipped,
    load_with_record,
)
from tdcompress.layers.registry import register_layer

__all__ = ["RECURRENCE_MODES", "FactorizedLSTM", "recurrence"]

#: how a :class:`FactorizedLSTM` runs, without autograd, a layer whose input module runs
#: factorized (its own contraction): ``"per_step"``, the recurrence as a loop of small ops
#: per time step (:func:`recurrence`); ``"fused"``, PyTorch's fused LSTM kernel (ONNX's
#: ``LSTM`` operator when exported) on the projected gates, with an identity input matrix
RECURRENCE_MODES = ("per_step", "fused")


def _loop(
    gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor, keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The LSTM recurrence over ``gx`` (T, B, 4H); ``keep``: also return the activated
    gates (T, B, 4H) and the cell states (T, B, H) for :class:`_Recurrence`'s backward."""
    w_t = w_hh.t()
    T = gx.shape[0]
    outs, gates, cells = [], [], []
    for t in range(T):  # the only loop over time steps
        g = torch.addmm(gx[t], h, w_t)
        i, f, gg, o = g.chunk(4, 1)
        i, f, gg, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(gg), torch.sigmoid(o)
        c = f * c + i * gg
        h = o * torch.tanh(c)
        outs.append(h)
        if keep:
            gates.append(torch.cat([i, f, gg, o], 1))
            cells.append(c)
    out = torch.stack(outs)
    if keep:
        return out, h, c, torch.stack(gates), torch.stack(cells)
    return out, h, c, None, None


class _Recurrence(torch.autograd.Function):
    """The recurrence with a hand-written backward: 6 ops per step (one small matmul)
    instead of autograd's ~20 nodes, and one GEMM for the weight gradient (2-3x faster
    forward+backward on long sequences with small hidden sizes)."""

    @staticmethod
    def forward(ctx, gx, h0, c0, w_hh):  # noqa: ANN001, ANN205
        out, h, c, gates, cells = _loop(gx, h0, c0, w_hh, keep=True)
        ctx.save_for_backward(out, gates, cells, h0, c0, w_hh)
        return out, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_cn):  # noqa: ANN001, ANN205
        out, gates, cells, h0, c0, w_hh = ctx.saved_tensors
        T, B, H = out.shape
        if d_out is None:
            d_out = torch.zeros_like(out)
        i, f, gg, o = gates.chunk(4, 2)
        c_prev = torch.cat([c0[None], cells[:-1]])
        tc = torch.tanh(cells)
        k_c = o * (1 - tc * tc)  # d c_t / d h_t (through h_t = o tanh(c_t))
        # d act / d preact times what multiplies the incoming (dc, dc, dc, dh) per gate
        deriv = torch.cat(
            [i * (1 - i) * gg, f * (1 - f) * c_prev, (1 - gg * gg) * i, o * (1 - o) * tc], 2
        )
        d_g = torch.empty_like(gates)
        dh = torch.zeros_like(h0)
        dc = torch.zeros_like(c0) if d_cn is None else d_cn.clone()
        for t in range(T - 1, -1, -1):
            dh = dh + d_out[t]
            dc = torch.addcmul(dc, dh, k_c[t])
            torch.mul(torch.cat([dc, dc, dc, dh], 1), deriv[t], out=d_g[t])
            dh = d_g[t] @ w_hh
            dc = dc * f[t]
        h_prev = torch.cat([h0[None], out[:-1]])
        d_w = d_g.reshape(T * B, 4 * H).t() @ h_prev.reshape(T * B, H)
        return d_g, dh, dc, d_w


def recurrence(
    gx: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output (T, B, H), h_n, c_n)`` of the LSTM recurrence on precomputed input gates
    ``gx`` (T, B, 4H, biases included). Under autograd (not tracing or exporting) it runs
    :class:`_Recurrence`; otherwise the plain loop, which traces and exports. Under
    autocast everything runs in the autocast dtype, as ``nn.LSTM`` does (mixed dtypes
    would break the hand-written backward)."""
    dev = gx.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        gx, h0, c0, w_hh = (t.to(dt) for t in (gx, h0, c0, w_hh))
        with torch.autocast(dev, enabled=False):
            return _recurrence(gx, h0, c0, w_hh)
    return _recurrence(gx, h0, c0, w_hh)


def _recurrence(
    gx: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    needs_grad = torch.is_grad_enabled() and (
        gx.requires_grad or h0.requires_grad or c0.requires_grad or w_hh.requires_grad
    )
    compiling = getattr(torch.compiler, "is_compiling", None)  # (torch >= 2.3)
    plain = torch.jit.is_tracing() or (compiling is not None and compiling())
    if needs_grad and not plain:
        out, c = _Recurrence.apply(gx, h0, c0, w_hh)
        return out, out[-1], c
    out, h, c, _, _ = _loop(gx, h0, c0, w_hh)
    return out, h, c


_OUTSIDE_GRAPH: list[Any] = []


def _outside_graph() -> Any:
    """``FactorizedLSTM._forward`` behind ``torch.compiler.disable``, made on first use
    (importing dynamo takes seconds; it is imported once something compiles): dynamo breaks
    the graph there and runs it eagerly. (Made while dynamo traces, the ``disable`` call
    is itself a graph break at the same place, once.)"""
    if not _OUTSIDE_GRAPH:
        _OUTSIDE_GRAPH.append(
            torch.compiler.disable(lambda module, input, hx: module._forward(input, hx))
        )
    return _OUTSIDE_GRAPH[0]


def _features(module: nn.Module, attr: str) -> int | None:
    v = getattr(module, attr, None)
    return v if isinstance(v, int) else None


@register_layer
class FactorizedLSTM(nn.Module):
    """LSTM with factorized input-to-hidden matrices (see the module docstring).

    Same constructor arguments, input/output shapes and ``(h_0, c_0)`` handling as
    ``nn.LSTM`` (``proj_size`` and ``bidirectional`` are not supported). ``input_layers``:
    one module (or None) per layer mapping ``in_k`` features to ``4 * hidden_size``
    (``in_0 = input_size``, otherwise ``hidden_size``); None gives a dense ``nn.Linear``
    without bias, initialised like ``nn.LSTM``'s ``weight_ih``. Any bias of a given module is
    added on top of ``bias_ih + bias_hh``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        *,
        input_layers: Sequence[nn.Module | None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for nm, v in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {nm} must be an int >= 1, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise TypeError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        if input_layers is None:
            input_layers = [None] * num_layers
        input_layers = list(input_layers)
        if len(input_layers) != num_layers:
            raise ValueError(
                f"{name}: input_layers has {len(input_layers)} entries, expected one per layer "
                f"(num_layers={num_layers})"
            )
        kw = {"device": device, "dtype": dtype}
        H = hidden_size
        mods: list[nn.Module] = []
        default: list[bool] = []
        for k, m in enumerate(input_layers):
            in_k = input_size if k == 0 else H
            if m is None:
                if init_skipped():  # (uninitialised, as the factorized layers then are)
                    m = nn.utils.skip_init(nn.Linear, in_k, 4 * H, bias=False, **kw)
                else:
                    m = nn.Linear(in_k, 4 * H, bias=False, **kw)
                default.append(True)
            else:
                if not isinstance(m, nn.Module):
                    raise TypeError(
                        f"{name}: input_layers[{k}] must be an nn.Module or None, got "
                        f"{type(m).__name__}"
                    )
                fi, fo = _features(m, "in_features"), _features(m, "out_features")
                if (fi is not None and fi != in_k) or (fo is not None and fo != 4 * H):
                    raise ValueError(
                        f"{name}: input_layers[{k}] maps {fi} -> {fo} features; layer {k} "
                        f"needs {in_k} -> {4 * H} (4 * hidden_size)"
                    )
                default.append(False)
            mods.append(m)
        self.input_layers = nn.ModuleList(mods)
        for k in range(num_layers):
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H, **kw)))
            if self.bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * H, **kw)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * H, **kw)))
            else:
                self.register_parameter(f"bias_ih_l{k}", None)
                self.register_parameter(f"bias_hh_l{k}", None)
        self._default = default
        #: recurrence mode by key (:meth:`recurrence_key`), set by :meth:`set_recurrence`
        #: and :func:`~tdcompress.layers.choose_execution`
        self._recurrence: dict[tuple[Any, ...], str] = {}
        if not init_skipped():
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s init, uniform in ``+-1/sqrt(hidden_size)``, for the recurrent
        weights, the biases and the default dense input layers; given input layers keep
        their own parameters."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for k in range(self.num_layers):
                for nm in ("weight_hh", "bias_ih", "bias_hh"):
                    p = getattr(self, f"{nm}_l{k}")
                    if p is not None:
                        p.uniform_(-bound, bound)
                if self._default[k]:
                    self.input_layers[k].weight.uniform_(-bound, bound)

    @classmethod
    def from_lstm(
        cls,
        lstm: nn.LSTM,
        input_layers: Sequence[nn.Module | None] | None = None,
    ) -> FactorizedLSTM:
        """A FactorizedLSTM carrying ``lstm``'s recurrent weights and biases, with
        ``input_layers[k]`` replacing ``weight_ih_l{k}`` (None: a dense ``nn.Linear`` holding
        a copy of ``weight_ih_l{k}``). The given modules are used as they are (not copied)."""
        name = f"{cls.__name__}.from_lstm"
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"{name}: lstm must be an nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size or lstm.bidirectional:
            raise ValueError(
                f"{name}: proj_size={lstm.proj_size}, bidirectional={lstm.bidirectional} "
                "is not supported; allowed: proj_size=0, bidirectional=False"
            )
        ref = lstm.weight_hh_l0
        out = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=lstm.dropout,
            input_layers=input_layers,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            for k in range(lstm.num_layers):
                names = ["weight_hh"] + (["bias_ih", "bias_hh"] if lstm.bias else [])
                for nm in names:
                    getattr(out, f"{nm}_l{k}").copy_(getattr(lstm, f"{nm}_l{k}"))
                if out._default[k]:
                    out.input_layers[k].weight.copy_(getattr(lstm, f"weight_ih_l{k}"))
        out.train(lstm.training)
        return out

    def dense_module(self) -> nn.LSTM:
        """The ``nn.LSTM`` computing this LSTM's function: every input layer's dense matrix
        (``to_dense()`` of a factorized layer, an ``nn.Linear``'s weight) as
        ``weight_ih_l{k}``, an input layer's own bias added to ``bias_ih_l{k}`` (an LSTM
        without biases then gets zero ones); a new module, in this LSTM's training mode. A
        TypeError for input layers of other kinds."""
        ref = self.weight_hh_l0
        in_bias = [getattr(m, "bias", None) for m in self.input_layers]
        biased = self.bias or any(isinstance(b, torch.Tensor) for b in in_bias)
        with torch.device("meta"):  # (uninitialised: every weight is copied below)
            lstm = nn.LSTM(
                self.input_size,
                self.hidden_size,
                self.num_layers,
                bias=biased,
                batch_first=self.batch_first,
                dropout=self.dropout,
                dtype=ref.dtype,
            )
        lstm = lstm.to_empty(device=ref.device)
        with torch.no_grad():
            for k, m in enumerate(self.input_layers):
                if isinstance(m, FactorizedLayer):
                    w = m.to_dense()
                elif type(m) is nn.Linear:
                    w = m.weight
                else:
                    raise TypeError(
                        f"{type(self).__name__}: input_layers[{k}] is a {type(m).__name__}; "
                        "only factorized layers and nn.Linear input layers have a dense "
                        "nn.LSTM equivalent"
                    )
                getattr(lstm, f"weight_ih_l{k}").copy_(w)
                getattr(lstm, f"weight_hh_l{k}").copy_(getattr(self, f"weight_hh_l{k}"))
                if biased:
                    b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
                    b_ih = torch.zeros_like(ref[:, 0]) if b_ih is None else b_ih
                    if isinstance(in_bias[k], torch.Tensor):
                        b_ih = b_ih + in_bias[k]
                    getattr(lstm, f"bias_ih_l{k}").copy_(b_ih)
                    if b_hh is None:
                        getattr(lstm, f"bias_hh_l{k}").zero_()
                    else:
                        getattr(lstm, f"bias_hh_l{k}").copy_(b_hh)
        return lstm.train(self.training)

    def _config(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The LSTM's record (constructor arguments; the input layers keep their own)."""
        return {RECORD_KEY: EXTRA_STATE_VERSION, "class": type(self).__name__, **self._config()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        load_with_record(self, super()._load_from_state_dict, state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded record describes this LSTM (a ValueError says what differs)."""
        name = type(self).__name__
        keys = ("class", *self._config())
        rec = check_record(state, name, keys)
        got = {k: rec[k] for k in keys}
        want = {"class": name, **self._config()}
        if got != want:
            diff = [f"{k}={got[k]!r} (this LSTM: {want[k]!r})" for k in keys if got[k] != want[k]]
            raise ValueError(
                f"{name}: the state dict holds another LSTM: {', '.join(diff)}; build the model "
                "from the file (tdcompress.load_compressed)"
            )

    def recurrence_key(self, input: torch.Tensor) -> tuple[Any, ...]:
        """The key of the recurrence mode for ``input`` (as :meth:`forward` takes it):
        ``(batch, T)``, the batch entry as the factorized layers key theirs."""
        if input.dim() == 2:
            return (1, int(input.shape[0]))
        b, t = (0, 1) if self.batch_first else (1, 0)
        return (batch_key(input.shape[b]), int(input.shape[t]))

    def set_recurrence(self, key: tuple[Any, ...], mode: str) -> None:
        """Run inputs of ``key`` (:meth:`recurrence_key`) in recurrence ``mode`` (one of
        :data:`RECURRENCE_MODES`); it matters only without autograd, for layers whose input
        module runs factorized and has more than ``4 * hidden_size`` features (see
        :meth:`_fused_plan`)."""
        if mode not in RECURRENCE_MODES:
            raise ValueError(f"mode must be one of {list(RECURRENCE_MODES)}, got {mode!r}")
        if "_recurrence" not in self.__dict__:  # (unpickled from an older tdcompress)
            self._recurrence = {}
        self._recurrence[tuple(key)] = mode

    def time_recurrence(
        self, input: torch.Tensor, repeats: int = 20, warmup: int = 3
    ) -> tuple[float, float] | None:
        """Median seconds of ``self(input)`` (no autograd) with the recurrence per step and
        fused, interleaved; ``None`` when the choice does not matter for ``input`` (no layer
        would run fused with an identity input matrix). Leaves the mode as it was."""
        key = self.recurrence_key(input)
        modes = self.__dict__.setdefault("_recurrence", {})
        was = modes.get(key)
        try:
            with torch.no_grad():
                self.set_recurrence(key, "fused")
                x = input.unsqueeze(1) if input.dim() == 2 else input
                if self.batch_first and input.dim() == 3:
                    x = x.transpose(0, 1)
                plan = self._fused_plan(x, key)
                if plan is None or all(w is not None for w, _ in plan):
                    return None
                times: dict[str, list[float]] = {m: [] for m in RECURRENCE_MODES}
                sync = torch.cuda.synchronize if input.device.type == "cuda" else (lambda: None)
                for k in range(warmup + repeats):
                    order = RECURRENCE_MODES if k % 2 == 0 else RECURRENCE_MODES[::-1]
                    for mode in order:
                        self.set_recurrence(key, mode)
                        sync()
                        t0 = time.perf_counter()
                        self(input)
                        sync()
                        if k >= warmup:
                            times[mode].append(time.perf_counter() - t0)
                return _median(times["per_step"]), _median(times["fused"])
        finally:
            if was is None:
                modes.pop(key, None)
            else:
                modes[key] = was

    def _fused_plan(
        self, x: torch.Tensor, key: tuple[Any, ...]
    ) -> list[tuple[torch.Tensor | None, Any]] | None:
        """How each layer runs through PyTorch's fused LSTM kernel (``torch._VF.lstm``, which
        ONNX export turns into ONNX's ``LSTM`` operator), or ``None``: the layers run one by
        one through :func:`recurrence` (under autograd; under ``torch.compile`` unless
        every input matrix is dense or folded; in recurrence mode ``"per_step"``).

        One entry per layer: ``(w_ih, extra_bias)``, the layer's input matrix as a dense
        tensor (a plain ``nn.Linear``; a factorized layer running ``x``'s rows ``"rebuilt"``:
        its kept kernel in eager inference (:func:`~tdcompress.layers._base.folded_weight`),
        the kernel folded by :func:`~tdcompress.layers.fold_kernels` under compile, or the
        kernel rebuilt from the cores in the graph when exporting, so the file keeps the
        cores and the runtime folds them once at load); or ``(None, module)``: the layer's
        input module runs as it is (its factorized contraction) and the kernel gets the
        projected gates with an identity input matrix (``4H x 4H``, built in the graph).
        The latter only for an input of more than ``4 * hidden_size`` features, in
        recurrence mode ``"fused"`` (``key``'s mode; without one: ``"fused"`` when
        exporting, as one ONNX ``LSTM`` operator is never slower than the loop unrolled
        into the graph, ``"per_step"`` in eager inference); a narrower input layer running
        factorized is rebuilt when exporting (the identity product alone costs as much as
        the dense one) and runs per step in eager inference."""
        exporting = _exporting()
        if torch.is_grad_enabled() and not exporting:
            return None
        compiling = _compiler_flag("is_dynamo_compiling") and not exporting
        plan: list[tuple[torch.Tensor | None, Any]] = []
        for k, m in enumerate(self.input_layers):
            if type(m) is nn.Linear:
                plan.append((m.weight, m.bias))
                continue
            in_k = self.input_size if k == 0 else self.hidden_size
            wide = in_k > 4 * self.hidden_size
            if isinstance(m, FactorizedLayer):
                rebuilt = chosen_mode(m, x) == "rebuilt"
                if rebuilt or (exporting and not wide):
                    w = m.to_dense() if exporting else folded_weight(m)
                    if w is None:  # (compiled without a folded kernel)
                        return None
                    plan.append((w, m.bias))
                    continue
            if compiling or not wide:
                return None
            mode = self.__dict__.get("_recurrence", {}).get(key)
            if (mode or ("fused" if exporting else "per_step")) != "fused":
                return None
            plan.append((None, m))
        return plan

    def _fused(
        self,
        x: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        plan: list[tuple[torch.Tensor | None, Any]],
        batch_first: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layers through ``torch._VF.lstm`` as :meth:`_fused_plan` says: all at once
        when every input matrix is dense, else one call per layer. ``batch_first``: ``x``
        (and the output) are (B, T, ..), as the kernel takes them (no transposes around it:
        under ``torch.compile`` they would be copies)."""
        bf = batch_first
        params = self._parameters
        H, L = self.hidden_size, self.num_layers
        biased = self.bias or any(w is not None and e is not None for w, e in plan)
        if all(w is not None for w, _ in plan):
            flat: list[torch.Tensor] = []
            for k, (w, extra) in enumerate(plan):
                flat += [w, params[f"weight_hh_l{k}"], *self._biases(k, w, extra, biased)]
            return torch._VF.lstm(  # type: ignore[attr-defined]
                x, (h0, c0), flat, biased, L, self.dropout, self.training, False, bf
            )
        hn, cn = [], []
        for k, (w, extra) in enumerate(plan):
            if k > 0 and self.dropout > 0.0 and self.training:
                x = F.dropout(x, self.dropout, True)
            if w is None:  # the module projects; the kernel multiplies by the identity
                T = x.shape[1] if bf else x.shape[0]
                x = extra(x.reshape(-1, x.shape[-1]))
                x = x.reshape(-1, T, 4 * H) if bf else x.reshape(T, -1, 4 * H)
                w, extra = torch.eye(4 * H, dtype=x.dtype, device=x.device), None
            b = self.bias or extra is not None
            flat = [w, params[f"weight_hh_l{k}"], *self._biases(k, w, extra, b)]
            x, h, c = torch._VF.lstm(  # type: ignore[attr-defined]
                x, (h0[k : k + 1], c0[k : k + 1]), flat, b, 1, 0.0, False, False, bf
            )
            hn.append(h)
            cn.append(c)
        return x, torch.cat(hn), torch.cat(cn)

    def _biases(
        self, k: int, w: torch.Tensor, extra: torch.Tensor | None, biased: bool
    ) -> list[torch.Tensor]:
        """``[b_ih, b_hh]`` of layer ``k`` for the fused kernel (an input layer's own bias
        ``extra`` added to ``b_ih``; zeros where the LSTM has none), or ``[]``."""
        if not biased:
            return []
        b_ih, b_hh = self._parameters[f"bias_ih_l{k}"], self._parameters[f"bias_hh_l{k}"]
        if b_ih is None or b_hh is None:  # (biases from some input layer only)
            b_ih = b_hh = w.new_zeros(w.shape[0])
        return [b_ih if extra is None else b_ih + extra, b_hh]

    #: ``nn.LSTM`` attributes for code that inspects them (neither option is supported)
    bidirectional = False
    proj_size = 0

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.LSTM`` (there is no cuDNN weight buffer)."""

    def _check_state(self, t: torch.Tensor, nm: str, batch: int | torch.SymInt | None) -> None:
        want = (
            (self.num_layers, self.hidden_size)
            if batch is None
            else (
                self.num_layers,
                batch,
                self.hidden_size,
            )
        )
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{type(self).__name__}: {nm} must have shape {want}, got {got}")

    def forward(
        self,
        input: torch.Tensor,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``input`` (T, B, I), (B, T, I) with ``batch_first``, or unbatched (T, I);
        returns ``output, (h_n, c_n)`` with ``nn.LSTM``'s shapes.

        Under ``torch.compile`` without autograd, a forward that runs PyTorch's fused LSTM
        kernel runs outside the graph, as dynamo runs ``nn.LSTM`` (inductor would unroll the
        kernel into per-step ops, slower here: FSDD TT 12x 0.82-0.91x of dense in the graph,
        0.95-0.99x outside it); the per-step recurrence of factorized input layers is
        traced."""
        if (
            _compiler_flag("is_dynamo_compiling")
            and not _exporting()
            and not torch.is_grad_enabled()
            and isinstance(input, torch.Tensor)
            and input.dim() in (2, 3)
            and self._fused_plan(input, self.recurrence_key(input)) is not None
        ):
            return _outside_graph()(self, input, hx)
        return self._forward(input, hx)

    def _forward(
        self,
        input: torch.Tensor,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"{name}: input must be a tensor (packed sequences are not supported; pad "
                f"them, e.g. torch.nn.utils.rnn.pad_packed_sequence), got {type(input).__name__}"
            )
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input must have shape (T, B, {self.input_size}) "
                f"({'(B, T, ...)' if self.batch_first else 'or batch_first'}) or "
                f"(T, {self.input_size}), got {tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else input
        if self.batch_first and not unbatched:
            x = x.transpose(0, 1)
        # B stays as given: symbolic under a dynamic-batch export (reshapes below use -1)
        T, B = int(x.shape[0]), x.shape[1]
        if T == 0:
            raise ValueError(
                f"{name}: input has sequence length 0 (shape {tuple(input.shape)}); "
                "the sequence length must be >= 1"
            )
        H, L = self.hidden_size, self.num_layers
        if hx is None:
            h0 = x.new_zeros(L, B, H)
            c0 = h0
        else:
            h0, c0 = hx
            self._check_state(h0, "h_0", None if unbatched else B)
            self._check_state(c0, "c_0", None if unbatched else B)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        plan = self._fused_plan(x, self.recurrence_key(input))
        if plan is not None:  # no autograd, or exporting: PyTorch's own LSTM kernel
            bf = self.batch_first and not unbatched  # (the kernel takes (B, T, ..) itself)
            x, h_n, c_n = self._fused(input if bf else x, h0, c0, plan, bf)
            if bf:
                return x, (h_n, c_n)
        else:
            hn, cn = [], []
            for k in range(L):
                if k > 0 and self.dropout > 0.0 and self.training:
                    x = F.dropout(x, self.dropout, True)
                gx = self.input_layers[k](x.reshape(-1, x.shape[-1])).reshape(T, -1, 4 * H)
                b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
                if b_ih is not None:
                    gx = gx + (b_ih + b_hh)
                x, h, c = recurrence(gx, h0[k], c0[k], getattr(self, f"weight_hh_l{k}"))
                hn.append(h)
                cn.append(c)
            h_n, c_n = torch.stack(hn), torch.stack(cn)
        if unbatched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (h_n, c_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s
