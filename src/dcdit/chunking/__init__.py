"""Dynamic chunking: routing, chunk and dechunk on packed variable-length batches."""
from dcdit.chunking.dechunk import ChunkLayer, DeChunkLayer, chunk, dechunk, nearest_kept_index, smooth_kept
from dcdit.chunking.packing import GroupNorm, PackedSeqs, packed_conv1d, packed_group_norm
from dcdit.chunking.routing import (
    STE,
    BoundarySelection,
    SpatialPredictabilityRouter,
    check_tail_drop,
    select_boundaries,
    ste,
)

__all__ = [
    "PackedSeqs", "packed_conv1d", "packed_group_norm", "GroupNorm",
    "SpatialPredictabilityRouter", "BoundarySelection", "select_boundaries", "check_tail_drop", "STE", "ste",
    "ChunkLayer", "DeChunkLayer", "chunk", "dechunk", "smooth_kept", "nearest_kept_index",
]
