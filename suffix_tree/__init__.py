"""Depth-bounded suffix trees over token sequences, compiled with numba.

Knows nothing of vLLM, torch or verl: token ids in, drafts out.
"""

from suffix_tree.draft import Draft
from suffix_tree.forest import DEFAULT_MAX_DEPTH, MemoryReport, SuffixForest, warm_up_kernels
from suffix_tree.tree import SuffixTree

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "Draft",
    "MemoryReport",
    "SuffixForest",
    "SuffixTree",
    "warm_up_kernels",
]
