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
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
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
    """Why ``pruned`` fails at another batch size where ``original`` runs (both on fake
    tensors: shapes only), or None. The other batch size is one more than the example's
    (two for a batch of one)."""
    args, kwargs = inputs
    sizes = [x.shape[0] for x in (*args, *kwargs.values()) if isinstance(x, TensorMeta) and x.shape]
    if not sizes:
        return None
    batch = sizes[0] + 1 if sizes[0] > 1 else 2
    error = _run_fake(pruned, inputs, sizes[0], batch)
    if error is None or _run_fake(original, inputs, sizes[0], batch) is not None:
        return None
    return f"at a batch of {batch} (the example's is {sizes[0]}): {error}"


def _run_fake(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]], batch: int, other: int) -> str | None:
    """None if ``model`` runs on fake copies of its state (no memory, no FLOPs, on the device
    its tensors claim: an exported graph names its device) and fake ``inputs`` whose batch
    ``batch`` is ``other``; else why not, with the innermost module that was running."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))

    def fake(x: Any) -> Any:
        if not isinstance(x, TensorMeta):
            return x
        shape = (other, *x.shape[1:]) if x.shape and x.shape[0] == batch else x.shape
        return FakeTensor(mode, torch.empty(shape, dtype=x.dtype, device="meta"), device)

    state = {n: mode.from_tensor(t) for n, t in (*model.named_parameters(), *model.named_buffers())}
    args, kwargs = tree_map(fake, inputs)
    running: list[str] = []

    def enter(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            running.append(name)
        return hook

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:  # a hook's return value would replace the output
        if running:
            running.pop()

    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    try:
        with torch.no_grad(), preserved_attributes(model), mode:
            torch.func.functional_call(model, state, args, kwargs)
    except Exception as exc:  # noqa: BLE001 -- any failure is the answer
        where = f"in module '{running[-1]}': " if running else ""
        return f"{where}{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for hook in hooks:
            hook.remove()
        refresh_flat_weights(model)
    return None
