"""Plots (matplotlib, Agg, PNG): routing maps, cost over time, quality vs compute, sample grids.

* (a) :func:`plot_boundary_maps` - x_t, x_0 prediction, boundary probability and kept tokens over steps;
* (b) :func:`plot_cost_over_time` - kept-token share and FLOPs per step against t (mean +- band);
* (c) :func:`plot_quality_vs_compute` - FID vs GFLOPs across models and drop fractions;
* (d) :func:`plot_class_grid` - a labelled sample grid, one row per class.

:class:`RoutingRecorder` is a sampling callback that collects what (a) and (b) need.
"""
from dcdit.viz.grid import image_grid, save_png
from dcdit.viz.plots import (
    Plot,
    choose_steps,
    default_display,
    plot_boundary_maps,
    plot_class_grid,
    plot_cost_over_time,
    plot_quality_vs_compute,
    upsample_map,
)
from dcdit.viz.record import RoutingRecord, RoutingRecorder

__all__ = [
    "image_grid", "save_png", "Plot", "choose_steps", "default_display", "upsample_map",
    "plot_boundary_maps", "plot_cost_over_time", "plot_quality_vs_compute", "plot_class_grid",
    "RoutingRecord", "RoutingRecorder",
]
