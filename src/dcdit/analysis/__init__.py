"""What the router does: segmentation quality and timestep adaptivity."""
from dcdit.analysis.routing import roc_auc, routing_vs_detail, what_tokens_buy

__all__ = ["roc_auc", "routing_vs_detail", "what_tokens_buy"]
