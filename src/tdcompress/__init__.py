"""tdcompress: compress neural networks with tensor decompositions.

The flow of one compression (Yin et al., CVPR 2021)::

    import tdcompress as tdc
    plan = tdc.plan(model, "tt", target_ratio=6.8, input_shape=(1, 3, 32, 32))
    admm = tdc.ADMM(model, plan, rho=1e-3)      # Z = project(W), U = 0
    ...  # train with loss + admm.penalty(); admm.update() per epoch or admm.step() per step
    compressed, report = tdc.decompose(model, plan)   # or tdc.compress_(model, plan)
    tdc.save_compressed(compressed, "m.pt", plan=plan)
    again = tdc.load_compressed("m.pt", make_dense_model)  # no decomposition
"""

from tdcompress import formats, layers, tensor
from tdcompress.admm import ADMM, ADMMSchedule
from tdcompress.export import ExportResult, export_model
from tdcompress.formats import FactorSpec, LayerGeometry, available_formats, get_format
from tdcompress.planning import CompressionPlan, LayerPlan, plan
from tdcompress.serialization import load_compressed, save_compressed
from tdcompress.surgery import DecompositionReport, compress_, decompose, densify

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "ADMMSchedule",
    "CompressionPlan",
    "DecompositionReport",
    "ExportResult",
    "FactorSpec",
    "LayerGeometry",
    "LayerPlan",
    "available_formats",
    "compress_",
    "decompose",
    "densify",
    "export_model",
    "formats",
    "get_format",
    "layers",
    "load_compressed",
    "plan",
    "save_compressed",
    "tensor",
]
