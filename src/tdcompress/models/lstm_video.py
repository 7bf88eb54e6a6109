"""LSTM video classifier (Yang et al. 2017; Yin et al. 2021, UCF11/HMDB51): every frame is
flattened to a vector, an LSTM runs over the frames, a linear head reads the last hidden
state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LSTMVideoClassifier", "lstm_video"]


class LSTMVideoClassifier(nn.Module):
    """``(B, T, C, H, W)`` or ``(B, T, F)`` -> logits ``(B, num_classes)``.

    ``self.lstm`` is an ``nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)``
    (``input_size = C * H * W``); ``self.fc`` maps the last time step's top-layer hidden
    state to the classes, after optional ``dropout``.

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
    ) -> None:
        super().__init__()
        for arg, v in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_classes", num_classes),
            ("num_layers", num_layers),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LSTMVideoClassifier: {arg} must be a positive int, got {v!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LSTMVideoClassifier: dropout must be in [0, 1), got {dropout!r}")
        self.input_size = input_size
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
        if x.dim() not in (3, 5):
            raise ValueError(
                f"LSTMVideoClassifier: input must be (B, T, C, H, W) or (B, T, F), "
                f"got shape {tuple(x.shape)}"
            )
        x = x.flatten(2)
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"LSTMVideoClassifier: frames have {x.shape[-1]} features, "
                f"expected input_size={self.input_size}"
            )
        out, _ = self.lstm(x)
        return self.fc(self.dropout(out[:, -1]))


def lstm_video(
    input_size: int = 3 * 120 * 160,
    hidden_size: int = 256,
    num_classes: int = 11,
    num_layers: int = 1,
    dropout: float = 0.0,
) -> LSTMVideoClassifier:
    """The UCF11 model by default: 160x120 RGB frames, 256 hidden units, 11 classes."""
    return LSTMVideoClassifier(input_size, hidden_size, num_classes, num_layers, dropout)
