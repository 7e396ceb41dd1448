"""paramshare: parameter sharing and tying for PyTorch.

Several parts of a model using one set of stored weights (hard ties), related weights pulled
together by a penalty (soft ties), and weights that learn to share. Everything a model shares
is described by one :class:`SharingPlan`, which survives the operations that break ties in
plain PyTorch.

Example:
    >>> import torch.nn as nn, paramshare as ps
    >>> lm = nn.ModuleDict({"embed": nn.Embedding(1000, 64), "head": nn.Linear(64, 1000, bias=False)})
    >>> lm = ps.tie(lm, "embed.weight", "head.weight")
    >>> ps.report(lm).ratio
    2.0
"""

__version__ = "0.1.0"

from .errors import CheckpointError, SharingError
from .plans import GroupStats, Kind, SharingPlan, TieGroup, get_kind, kind_names, register_kind

# hard ties, layer sharing, plans and reports
from .tying import apply_plan, check, find_ties, plan, tie, tie_modules, untie
from .layers import layer_assignment, share_layers
from .report import SharingReport, report

# sharing-aware checkpoints
from .checkpoint import Checkpoint, LoadResult, load, read, save

# learned hard sharing: weight clustering (the codebook kind), HashedNets, soft weight-sharing
from .cluster import cluster, kmeans1d, uncluster
from .hashing import hash  # noqa: A004 - ps.hash, HashedNets
from .gmm import GMMPrior

# soft tying: penalties between models, toward references, within groups
from .soft import SoftTie, SoftTieWarning, anchor, group_tie, harden, soft_tie

# between no sharing and full sharing: template banks, relaxed (low-rank delta) and basis sharing
from .bank import materialize, template_share
from .relaxed import convert_to_shared, relax
from .basis import basis_share

# GrOWL: sparsity and tying of correlated features (the rows kind)
from .growl import GrOWL, growl_tie, owl_norm, owl_regression, owl_weights, prox_owl, tie_rows

# ps.nn: modules with sharing built in; ps.distributed: DDP/FSDP2 with ties
from . import nn
from . import distributed

__all__ = [
    "__version__",
    # modules with sharing built in
    "nn",
    # distributed training (ps.distributed.fsdp_groups, shard, check_ties)
    "distributed",
    # errors
    "SharingError",
    # plans and kinds
    "SharingPlan",
    "TieGroup",
    "GroupStats",
    "Kind",
    "register_kind",
    "get_kind",
    "kind_names",
    # hard ties
    "tie",
    "tie_modules",
    "untie",
    "find_ties",
    "plan",
    "apply_plan",
    "check",
    "share_layers",
    "layer_assignment",
    # learned hard sharing: weight clustering
    "kmeans1d",
    "cluster",
    "uncluster",
    # learned hard sharing: hashing
    "hash",
    "GMMPrior",
    # learned sharing: GrOWL (sparsity and tying of correlated features)
    "owl_weights",
    "owl_norm",
    "prox_owl",
    "GrOWL",
    "tie_rows",
    "growl_tie",
    "owl_regression",
    # soft tying (penalties between models, toward references, within groups)
    "soft_tie",
    "anchor",
    "group_tie",
    "harden",
    "SoftTie",
    "SoftTieWarning",
    # checkpoints
    "save",
    "load",
    "read",
    "LoadResult",
    "Checkpoint",
    "CheckpointError",
    # cross-layer banks and relaxed sharing
    "template_share",
    "basis_share",
    "convert_to_shared",
    "relax",
    "materialize",
    # reports
    "report",
    "SharingReport",
]
