"""tdcompress: compress neural networks with tensor decompositions."""

__version__ = "0.1.0"
