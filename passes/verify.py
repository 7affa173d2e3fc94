"""Verify a pruned model: it computes what the rewritten graph computes, at the example's
batch size and at another one.

Needs: the pruned model (the caller's class, or the rewritten graph itself), the
rewritten graph, the original model, and the example inputs (``(args, kwargs)`` with
:class:`TensorMeta` for tensors). Does not change any of them (buffers a training-mode
batch norm updates are restored). Returns a message naming the module where the pruned
model goes wrong, or None.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from .adopt import _close, _example
from .meta import TensorMeta
from .shapes import refresh_flat_weights
from .trace import preserved_attributes

__all__ = ["class_mismatch", "batch_failure"]


def class_mismatch(root: nn.Module, gm: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> str | None:
    """Where the pruned class ``root`` first differs from the rewritten fx graph ``gm`` on the
    example inputs (the first called module, in graph order, whose output differs), or None."""
    device = next((t.device for t in (*root.parameters(), *root.buffers())), torch.device("cpu"))
    if device.type == "meta":
        return None  # nothing to compare but shapes, which the batch check sees
    gen = torch.Generator().manual_seed(0)
    args, kwargs = tree_map(lambda x: _example(x, device, gen), inputs)
    graph_values: dict[str, Any] = {}
    module_values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.op == "call_module":
                graph_values.setdefault(str(n.target), value)
            return value

    def keep(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            module_values.setdefault(name, out)
        return hook

    state = {id(t): (t, t.detach().clone()) for t in (*root.buffers(), *gm.buffers())}
    hooks = [m.register_forward_hook(keep(name)) for name, m in root.named_modules() if name]
    try:
        with torch.no_grad(), preserved_attributes(root):
            expected = Recorder(gm).run(*args, *kwargs.values())
            try:
                actual = root(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- reported with where it happened
                return f"its forward fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for tensor, saved in state.values():
                tensor.copy_(saved)
    if _close(tree_leaves(expected), tree_leaves(actual)):  # a dict and an OrderedDict hold the same
        return None
    for name, value in graph_values.items():
        if name in module_values and not _close(tree_leaves(value), tree_leaves(module_values[name])):
            return f"module '{name}' ({type(root.get_submodule(name)).__name__}) gives other values than the graph"
    return "its output differs from the graph's"


def batch_failure(
    pruned: nn.Module, original: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]
) -> str | None:
    """Why ``pruned`` fails at another batch size where ``original`` runs (both on meta
    tensors: shapes only), or None. The other batch size is one more than the example's
    (two for a batch of one)."""
    args, kwargs = inputs
    sizes = [x.shape[0] for x in (*args, *kwargs.values()) if isinstance(x, TensorMeta) and x.shape]
    if not sizes:
        return None
    batch = sizes[0] + 1 if sizes[0] > 1 else 2
    metas = tree_map(lambda x: _meta(x, sizes[0], batch), inputs)
    error = _run_meta(pruned, metas)
    if error is None or _run_meta(original, metas) is not None:
        return None
    return f"at a batch of {batch} (the example's is {sizes[0]}): {error}"


def _meta(x: Any, batch: int, other: int) -> Any:
    if not isinstance(x, TensorMeta):
        return x
    shape = (other, *x.shape[1:]) if x.shape and x.shape[0] == batch else x.shape
    return torch.zeros(shape, dtype=x.dtype, device="meta")


def _run_meta(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> str | None:
    """None if ``model`` runs on meta copies of its state and ``inputs``; else why not, with
    the innermost module that was running."""
    state = {n: torch.empty_like(t, device="meta") for n, t in (*model.named_parameters(), *model.named_buffers())}
    running: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, name=name: running.append(name)))
            hooks.append(m.register_forward_hook(lambda _m, _a, _o: running.pop() if running else None))
    args, kwargs = inputs
    try:
        with torch.no_grad(), preserved_attributes(model):
            torch.func.functional_call(model, state, args, kwargs)
    except Exception as exc:  # noqa: BLE001 -- any failure is the answer
        where = f"in module '{running[-1]}': " if running else ""
        return f"{where}{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for hook in hooks:
            hook.remove()
        refresh_flat_weights(model)
    return None
