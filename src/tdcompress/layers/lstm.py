""":class:`FactorizedLSTM`: an ``nn.LSTM``-compatible LSTM whose input-to-hidden matrices
are arbitrary (factorized) linear modules, as in TT-LSTM (Yang et al. 2017).

Each layer ``k`` maps its whole input sequence through ``input_layers[k]`` (one call on all
``T * B`` rows: ``(.., in_k) -> (.., 4 * hidden_size)``, the four gates sharing one
factorized matrix), adds ``bias_ih_l{k} + bias_hh_l{k}``, then runs the recurrence with the
dense ``weight_hh_l{k}`` (4H, H). Gate order is PyTorch's: input, forget, cell, output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdcompress.layers._base import (
    EXTRA_STATE_VERSION,
    RECORD_KEY,
    FactorizedLayer,
    _exporting,
    check_record,
    chosen_mode,
    folded_weight,
    init_skipped,
    load_with_record,
)
from tdcompress.layers.registry import register_layer

__all__ = ["FactorizedLSTM", "recurrence"]


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

    def _dense_inputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], bool] | None:
        """Without autograd (not tracing or exporting), where every input layer runs the
        rows of ``x`` as one dense matrix (a plain ``nn.Linear``, or a factorized layer whose
        execution choice for them is ``"rebuilt"``, its kernel kept by
        :func:`~tdcompress.layers._base.folded_weight`; under ``torch.compile``, folded by
        :func:`~tdcompress.layers.fold_kernels`): the flat weights of PyTorch's LSTM kernel
        (``w_ih, w_hh[, b_ih, b_hh]`` per layer, an input layer's own bias added to
        ``b_ih``) and whether they hold biases. ``None`` otherwise: the layers run one by
        one."""
        if torch.is_grad_enabled() or _exporting():
            return None
        weights: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for m in self.input_layers:
            if type(m) is nn.Linear:
                weights.append((m.weight, m.bias))
                continue
            if not isinstance(m, FactorizedLayer) or chosen_mode(m, x) != "rebuilt":
                return None
            w = folded_weight(m)
            if w is None:
                return None
            weights.append((w, m.bias))
        params = self._parameters
        biased = self.bias or any(extra is not None for _, extra in weights)
        flat: list[torch.Tensor] = []
        for k, (w, extra) in enumerate(weights):
            flat += [w, params[f"weight_hh_l{k}"]]
            if not biased:
                continue
            b_ih, b_hh = params[f"bias_ih_l{k}"], params[f"bias_hh_l{k}"]
            if b_ih is None:  # (biases from some input layer only)
                b_ih = b_hh = w.new_zeros(w.shape[0])
            flat += [b_ih if extra is None else b_ih + extra, b_hh]
        return flat, biased

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
        returns ``output, (h_n, c_n)`` with ``nn.LSTM``'s shapes."""
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
        dense = self._dense_inputs(x)
        if dense is not None:  # no autograd: PyTorch's own LSTM kernel, all layers at once
            x, h_n, c_n = torch._VF.lstm(  # type: ignore[attr-defined]
                x, (h0, c0), dense[0], dense[1], L, self.dropout, self.training, False, False
            )
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
