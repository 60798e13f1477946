"""Plots (matplotlib, Agg backend, PNG): routing maps, cost over time, quality vs compute, sample grids.

Import the plotting functions from here; matplotlib is imported lazily inside them.
"""
from dcdit.viz.grid import image_grid, save_png

__all__ = ["image_grid", "save_png"]
