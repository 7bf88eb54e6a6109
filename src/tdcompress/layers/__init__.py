"""Factorized nn.Modules."""
