"""A small transformer encoder over the rows of an image (each row one token), built from
PyTorch's own ``nn.TransformerEncoder``: the results row of issue 23 (MNIST rows as 28
tokens of 28 pixels)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RowTransformer", "row_transformer"]


class RowTransformer(nn.Module):
    """``(B, C, H, W)`` images -> logits: the ``H`` rows (``C * W`` values each) are tokens,
    embedded by ``embed`` (Linear) plus a learned position embedding, run through
    ``encoder`` (``nn.TransformerEncoder`` of pre-norm layers, ``batch_first``), averaged
    over the tokens, normalised and classified by ``head``. The feed-forward matrices are
    ``encoder.layers.<k>.linear1`` / ``linear2``."""

    def __init__(
        self,
        tokens: int,
        token_size: int,
        num_classes: int,
        d_model: int = 64,
        nhead: int = 4,
        dim_feedforward: int = 256,
        num_layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for arg, v in (
            ("tokens", tokens),
            ("token_size", token_size),
            ("num_classes", num_classes),
            ("d_model", d_model),
            ("nhead", nhead),
            ("dim_feedforward", dim_feedforward),
            ("num_layers", num_layers),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RowTransformer: {arg} must be a positive int, got {v!r}")
        if d_model % nhead:
            raise ValueError(
                f"RowTransformer: d_model={d_model} must be a multiple of nhead={nhead}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"RowTransformer: dropout must be in [0, 1), got {dropout!r}")
        self.tokens, self.token_size = tokens, token_size
        self.embed = nn.Linear(token_size, d_model)
        self.pos = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] != self.tokens or x.shape[1] * x.shape[3] != self.token_size:
            raise ValueError(
                f"RowTransformer: input must be (B, C, {self.tokens}, W) with C * W = "
                f"{self.token_size}, got shape {tuple(x.shape)}"
            )
        t = x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C * W): one token per row
        h = self.encoder(self.embed(t) + self.pos)
        return self.head(self.norm(h.mean(1)))


def row_transformer(
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    d_model: int = 64,
    nhead: int = 4,
    dim_feedforward: int = 256,
    num_layers: int = 2,
    dropout: float = 0.1,
) -> RowTransformer:
    """MNIST by default: 28 tokens of 28 pixels, 2 pre-norm layers of width 64 (4 heads,
    feed-forward 256)."""
    return RowTransformer(
        image_size,
        in_channels * image_size,
        num_classes,
        d_model,
        nhead,
        dim_feedforward,
        num_layers,
        dropout,
    )
