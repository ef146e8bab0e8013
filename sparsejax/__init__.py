"""sparsejax: sparse training in JAX whose memory scales with the non-zeros."""

from sparsejax.fanin_matmul import fixed_fanin_matmul
from sparsejax.fixed_fanin import FixedFanIn, check_fixed_fanin, default_index_dtype, random_topology
from sparsejax.masked import MaskedLinear
from sparsejax.nm import is_nm_sparse, nm_mask
from sparsejax import nn

__version__ = "0.1.0"

__all__ = [
    "FixedFanIn",
    "MaskedLinear",
    "check_fixed_fanin",
    "default_index_dtype",
    "fixed_fanin_matmul",
    "is_nm_sparse",
    "nm_mask",
    "nn",
    "random_topology",
]
