"""sparsejax: sparse training in JAX whose memory scales with the non-zeros."""

from sparsejax.dispatch import resolve_impl
from sparsejax.fanin_matmul import fixed_fanin_matmul
from sparsejax.fixed_fanin import (FixedFanIn, check_fixed_fanin, default_index_dtype,
                                   random_topology)
from sparsejax.mvue import nm_prune, prune_grad, prune_weight_grad, pruned_linear
from sparsejax.masked import MaskedDense
from sparsejax.nm import is_nm_sparse, nm_mask
from sparsejax.rewiring import draw_columns, rigl_regrowth_columns
from sparsejax.topology import (RegrowthCandidates, SetTopologyState, is_rewire_step,
                                set_topology, sparse_layer_names, static_topology)
from sparsejax import memory
from sparsejax import mvue
from sparsejax import nn
from sparsejax import supar
from sparsejax import xmc
from sparsejax.supar import ParamSpec, SuPar, scale_by_supar

__version__ = "0.1.0"

__all__ = [
    "FixedFanIn",
    "MaskedDense",
    "ParamSpec",
    "RegrowthCandidates",
    "SetTopologyState",
    "SuPar",
    "check_fixed_fanin",
    "default_index_dtype",
    "draw_columns",
    "fixed_fanin_matmul",
    "is_nm_sparse",
    "is_rewire_step",
    "nm_mask",
    "nm_prune",
    "memory",
    "mvue",
    "nn",
    "prune_grad",
    "prune_weight_grad",
    "pruned_linear",
    "random_topology",
    "resolve_impl",
    "rigl_regrowth_columns",
    "scale_by_supar",
    "set_topology",
    "sparse_layer_names",
    "static_topology",
    "supar",
    "xmc",
]
