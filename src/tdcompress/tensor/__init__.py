"""Pure tensor math on torch tensors (no nn): TT, tensor ring, Tucker, low rank, factorizations.

Every decomposition accepts float16/bfloat16/float32/float64 tensors on any device, never
modifies its input, runs under ``no_grad`` and returns tensors of the input's dtype and
device; reconstructions (``*_to_tensor``) are differentiable.
"""

from tdcompress.tensor.factorize import balanced_factorization, factorizations
from tdcompress.tensor.lowrank import lowrank_project, lowrank_svd
from tdcompress.tensor.tr import tr_clip_ranks, tr_project, tr_svd, tr_to_tensor
from tdcompress.tensor.tt import (
    tt_clip_ranks,
    tt_max_ranks,
    tt_project,
    tt_ranks,
    tt_svd,
    tt_to_tensor,
)
from tdcompress.tensor.tucker import mode_product, tucker, tucker_project, tucker_to_tensor

__all__ = [
    "balanced_factorization",
    "factorizations",
    "lowrank_project",
    "lowrank_svd",
    "mode_product",
    "tr_clip_ranks",
    "tr_project",
    "tr_svd",
    "tr_to_tensor",
    "tt_clip_ranks",
    "tt_max_ranks",
    "tt_project",
    "tt_ranks",
    "tt_svd",
    "tt_to_tensor",
    "tucker",
    "tucker_project",
    "tucker_to_tensor",
]
