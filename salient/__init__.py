"""Salient: discover the core and spurious neural features of image classifiers (Singla & Feizi, ICLR 2022)."""

__version__ = "0.1.0"
