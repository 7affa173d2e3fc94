"""Shape propagation on meta tensors.

Needs: a GraphModule. Adds ``node.meta[VALUE]`` (see :mod:`passes.meta`) to every node.
Weights are never read: parameters and buffers are replaced by meta tensors of the
same shape for the run (``torch.func.functional_call``), and factories called inside
``forward`` create meta tensors, so no real FLOPs run and a model built on the
``meta`` device works as well as a real one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .errors import ShapeError
from .meta import VALUE, TensorMeta

__all__ = ["propagate_shapes", "to_meta", "describe"]


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty meta tensor of the same shape."""
    return tree_map(
        lambda t: t if not isinstance(t, torch.Tensor) or t.is_meta else t.to("meta"), value
    )


def describe(value: Any) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorMeta`."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (tuple, list)):
        return type(value)(describe(v) for v in value) if type(value) in (tuple, list) else tuple(
            describe(v) for v in value
        )
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except ShapeError:
            raise
        except Exception as exc:
            raise ShapeError(
                f"running node '{n.name}' ({n.op} {_target_name(n)}) on meta tensors failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        n.meta[VALUE] = describe(result)
        return result


class _Runner(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return _ShapeInterpreter(self.gm).run(*args)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Run ``gm`` on meta copies of ``example_inputs`` and its own state, recording shapes."""
    state = {f"gm.{k}": _meta_like(v) for k, v in gm.named_parameters()}
    state.update({f"gm.{k}": _meta_like(v) for k, v in gm.named_buffers()})
    with torch.no_grad(), torch.device("meta"):
        torch.func.functional_call(_Runner(gm), state, to_meta(tuple(example_inputs)))


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.is_meta else torch.empty_like(t, device="meta")


def _target_name(n: fx.Node) -> str:
    target = n.target
    return getattr(target, "__name__", None) or str(target)
