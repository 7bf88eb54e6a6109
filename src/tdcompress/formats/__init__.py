"""Factorization formats: one owner per weight layout (see :mod:`tdcompress.formats.base`).

Importing this package registers ``"tt"``, ``"tr"``, ``"tucker2"`` and ``"svd"``.
"""

from tdcompress.formats import lowrank, tr, tt, tucker2  # noqa: F401  (register the formats)
from tdcompress.formats.base import (
    FactorSpec,
    Format,
    LayerGeometry,
    available_formats,
    get_format,
    register_format,
)

__all__ = [
    "FactorSpec",
    "Format",
    "LayerGeometry",
    "available_formats",
    "get_format",
    "register_format",
]
