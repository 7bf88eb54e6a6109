"""Factorized nn.Modules: the Linear/Conv2d layers each with ``from_dense(...)`` and
``to_dense()``; ``FactorizedLSTM.from_lstm(...)``; :func:`choose_execution` (run each
layer factorized or through its dense kernel rebuilt from the cores, whichever measures
faster); the registry of which layer builds each format (:func:`build`,
:func:`register_layer`)."""

from tdcompress.layers._base import (
    ANY_SHAPE,
    EXECUTION_MODES,
    ExecutionRecord,
    choose_execution,
    clear_execution,
    execution_modes,
    fold_kernels,
    folded_weight,
    folding,
    rebuilt_everywhere,
    rebuilt_layers,
    set_execution,
    set_model_execution,
    unfold_kernels,
    warm_plans,
)
from tdcompress.layers.lowrank import LowRankConv2d, LowRankLinear
from tdcompress.layers.lstm import RECURRENCE_MODES, FactorizedLSTM
from tdcompress.layers.registry import (
    build,
    build_initialized,
    layer_class,
    layer_classes,
    register_layer,
)
from tdcompress.layers.tr import TRConv2d, TRLinear
from tdcompress.layers.tt import TTConv2d, TTLinear
from tdcompress.layers.tucker2 import Tucker2Conv2d

__all__ = [
    "ANY_SHAPE",
    "EXECUTION_MODES",
    "ExecutionRecord",
    "choose_execution",
    "clear_execution",
    "execution_modes",
    "fold_kernels",
    "folded_weight",
    "folding",
    "rebuilt_everywhere",
    "rebuilt_layers",
    "set_execution",
    "set_model_execution",
    "unfold_kernels",
    "FactorizedLSTM",
    "RECURRENCE_MODES",
    "LowRankConv2d",
    "LowRankLinear",
    "TRConv2d",
    "TRLinear",
    "TTConv2d",
    "TTLinear",
    "Tucker2Conv2d",
    "warm_plans",
    "build",
    "build_initialized",
    "layer_class",
    "layer_classes",
    "register_layer",
]
