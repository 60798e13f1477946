"""What the router does: segmentation quality and timestep adaptivity."""
from dcdit.analysis.routing import roc_auc, routing_vs_detail

__all__ = ["roc_auc", "routing_vs_detail"]
