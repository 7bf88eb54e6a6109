"""Factorization formats: one owner per weight layout (see :mod:`tdcompress.formats.base`)."""

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
