"""Dynamic chunking: routing, chunk and dechunk on packed variable-length batches."""
from dcdit.chunking.chunk import ChunkLayer, chunk
from dcdit.chunking.dechunk import DeChunkLayer, dechunk, nearest_kept_index, smooth_kept
from dcdit.chunking.packing import GroupNorm, PackedSeqs, packed_conv1d, packed_group_norm
from dcdit.chunking.ratio import ratio_group_size, ratio_loss, ratio_targets, stage_ratio_loss
from dcdit.chunking.routing import (
    ROUTER_MODES,
    STE,
    SpatialPredictabilityRouter,
    StageRouting,
    check_router_mode,
    check_tail_drop,
    fixed_routing,
    lattice,
    sample_keys,
    select_boundaries,
    ste,
    ste_residual,
)

__all__ = [
    "PackedSeqs", "packed_conv1d", "packed_group_norm", "GroupNorm",
    "SpatialPredictabilityRouter", "StageRouting", "select_boundaries", "check_tail_drop", "STE", "ste", "ste_residual",
    "ROUTER_MODES", "check_router_mode", "fixed_routing", "lattice", "sample_keys",
    "ratio_loss", "stage_ratio_loss", "ratio_targets", "ratio_group_size",
    "ChunkLayer", "DeChunkLayer", "chunk", "dechunk", "smooth_kept", "nearest_kept_index",
]
