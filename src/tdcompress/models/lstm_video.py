"""LSTM sequence classifiers: the video classifier of Yang et al. 2017 and Yin et al. 2021
(UCF11/HMDB51: every frame flattened to a vector, an LSTM over the frames, a linear head on
the last hidden state), and the same model on padded sequences of variable length (the FSDD
spectrogram sequences of :mod:`tdcompress.data.speech`), which reads each sequence's last
valid hidden state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LSTMClassifier", "LSTMVideoClassifier", "lstm_video", "lstm_speech"]


class LSTMClassifier(nn.Module):
    """``(B, T, C, H, W)`` or ``(B, T, F)`` -> logits ``(B, num_classes)``.

    ``self.lstm`` is an ``nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)``
    (``input_size = C * H * W``); ``self.fc`` maps the last time step's top-layer hidden
    state to the classes, after optional ``dropout``.

    ``mask_channel``: the input is ``(B, T, input_size + 1)`` padded sequences whose last
    channel is 1 on valid steps and 0 on padding (valid steps first); the head reads each
    sequence's last valid hidden state (a gather: one batch, no loop; the LSTM is causal, so
    the padding after a sequence's end does not change it). Padded steps are computed and
    discarded, as with any padded batch.

    Initialised as the Keras LSTM of the TT-RNN papers: Glorot-uniform input weights,
    orthogonal recurrent weights, zero biases except a forget-gate bias of 1 (in
    ``bias_ih``; PyTorch's gate order is input, forget, cell, output); Glorot-uniform head.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        mask_channel: bool = False,
    ) -> None:
        super().__init__()
        for arg, v in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_classes", num_classes),
            ("num_layers", num_layers),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LSTMClassifier: {arg} must be a positive int, got {v!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LSTMClassifier: dropout must be in [0, 1), got {dropout!r}")
        self.input_size = input_size
        self.mask_channel = bool(mask_channel)
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras-style initialisation (see the class docstring)."""
        h = self.lstm.hidden_size
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(p)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)
                if name.startswith("bias_ih"):
                    nn.init.ones_(p[h : 2 * h])
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if x.dim() not in (3, 5) or (self.mask_channel and x.dim() != 3):
            want = "(B, T, F + 1)" if self.mask_channel else "(B, T, C, H, W) or (B, T, F)"
            raise ValueError(f"{name}: input must be {want}, got shape {tuple(x.shape)}")
        x = x.flatten(2)
        want = self.input_size + self.mask_channel
        if x.shape[-1] != want:
            raise ValueError(
                f"{name}: steps have {x.shape[-1]} features, expected {want} (input_size="
                f"{self.input_size}{' + the valid-step channel' if self.mask_channel else ''})"
            )
        if not self.mask_channel:
            out, _ = self.lstm(x)
            return self.fc(self.dropout(out[:, -1]))
        out, _ = self.lstm(x[..., :-1])
        last = x[..., -1].sum(1).long().clamp(1, x.shape[1]) - 1  # (B,) last valid step
        h = out.gather(1, last.view(-1, 1, 1).expand(-1, 1, out.shape[2])).squeeze(1)
        return self.fc(self.dropout(h))


#: the name of the first use of this class (UCF11 videos), kept for existing code
LSTMVideoClassifier = LSTMClassifier


def lstm_video(
    input_size: int = 3 * 120 * 160,
    hidden_size: int = 256,
    num_classes: int = 11,
    num_layers: int = 1,
    dropout: float = 0.0,
) -> LSTMClassifier:
    """The UCF11 model by default: 160x120 RGB frames, 256 hidden units, 11 classes."""
    return LSTMClassifier(input_size, hidden_size, num_classes, num_layers, dropout)


def lstm_speech(
    input_size: int = 1024,
    hidden_size: int = 128,
    num_classes: int = 10,
    num_layers: int = 1,
    dropout: float = 0.0,
) -> LSTMClassifier:
    """The FSDD model by default: 1,024-value steps (8 spectrogram frames of 128 bins) with
    the valid-step channel, 128 hidden units, 10 digits."""
    return LSTMClassifier(input_size, hidden_size, num_classes, num_layers, dropout, True)
