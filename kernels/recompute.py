"""How much of a recomputed backward runs at once.

The spatial-bias and vector-head backwards recompute their reference chunk by chunk of query
rows and differentiate it, so memory stays bounded. Each chunk costs tens of small kernel
launches plus autograd's bookkeeping; with a fixed 4M-element chunk an H200 ran 32 to 128
chunks per call, and the backward took 4 to 9 times one reference pass (bench/RESULTS.md,
2026-11-28). On a GPU the chunk is therefore sized from free memory.
"""
from __future__ import annotations

import torch

# about this many intermediates of one chunk are alive at once, 4 bytes each (float32 math)
_LIVE_INTERMEDIATES = 16


def chunk_elements(device: torch.device, floor: int) -> int:
    """Elements per intermediate of one chunk: floor on the CPU; on a GPU an eighth of the
    free memory shared among the live intermediates, and never less than floor."""
    if device.type != "cuda":
        return floor
    free, _ = torch.cuda.mem_get_info(device)
    return max(floor, free // (8 * 4 * _LIVE_INTERMEDIATES))


def chunk_rows(device, floor: int, elements_per_row: int) -> int:
    """Query rows per recompute chunk (at least one), each row holding elements_per_row
    elements of every intermediate."""
    return max(1, chunk_elements(torch.device(device), floor) // max(1, elements_per_row))
