"""depgraph: which parts of a PyTorch model must be pruned together.

>>> import torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> a = depgraph.analyze(net, torch.zeros(1, 4))
>>> [(g.size, [m.name for m in g.members]) for g in a.groups]
[(8, ['0.weight', '0.bias', '2.weight'])]
"""

from . import errors
from .activations import ActivationStats, ChannelStats, activation_importance, activation_stats
from .analyze import analyze, infer_inputs
from .apply import prune, simulate, unsimulate
from .calibrate import gradient_importance, recalibrate_batch_norm
from .compose import compose
from .costs import Cost, CostModel, cost
from .depth import block_importance, calibration_loss
from .errors import DepgraphError, InputError, PlanError, ShapeError, TraceError
from .groups import ActivationMember, Analysis, Block, Coupled, Group, Member, Pinned
from .latency import LatencyTable, latency_table, measure_latency
from .plan import Plan, Reconciliation
from .regularize import GroupRegularizer
from .report import report
from .solver import solve
from .stream import prune_checkpoint

__all__ = [
    "analyze", "infer_inputs", "solve", "prune", "prune_checkpoint", "simulate", "unsimulate", "compose",
    "GroupRegularizer", "block_importance", "calibration_loss", "cost", "Cost", "CostModel", "report",
    "recalibrate_batch_norm", "gradient_importance", "activation_stats", "activation_importance",
    "ActivationStats", "ChannelStats", "latency_table", "measure_latency", "LatencyTable", "Plan", "Reconciliation",
    "Analysis", "Group", "Member", "ActivationMember", "Pinned", "Coupled", "Block", "errors",
    "DepgraphError", "TraceError", "ShapeError", "InputError", "PlanError",
]
__version__ = "0.1.0"
