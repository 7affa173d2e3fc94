"""A pruned model keeps its own class where a module attribute holds each literal pruning
changes (issue "Ship it", item 7); the graph, with a warning naming the literal, where none does.

Each test prunes, compares with simulate at inputs the analysis never saw, and checks the class.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import Tensor, fx, nn

import depgraph

timm = pytest.importorskip("timm")


def pruned_and_simulated(model: nn.Module, x: Tensor, keep: Callable[[depgraph.Group], list[int]] | None = None
                         ) -> tuple[nn.Module, nn.Module]:
    """Prune and simulate ``model`` keeping ``keep(group)`` of each group (every other unit by default)."""
    torch.manual_seed(0)
    a = depgraph.analyze(model.eval(), x)
    keep = keep or (lambda g: list(range(0, g.size, 2)) if g.size >= 2 * g.min_keep else list(range(g.min_keep)))
    plan = depgraph.Plan.from_keep(a, {g.index: keep(g) for g in a.groups})
    return depgraph.prune(model, plan), depgraph.simulate(model, plan)


def assert_agree(pruned: nn.Module, simulated: nn.Module, x: Any) -> None:
    with torch.no_grad():
        p, s = pruned(x), simulated(x)
    scale = max(s.abs().max().item(), 1e-3)
    assert (p - s).abs().max().item() <= 1e-4 * scale


# -- hand-built models --------------------------------------------------------------------


class Tokens(nn.Module):
    """Patches flattened with the width read from an attribute, as torchvision's ViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 8
        self.proj = nn.Conv2d(3, 8, 2, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.proj(x).reshape(x.shape[0], self.hidden, -1).mean(-1))


class Literal(Tokens):
    """The same with the width written in the forward: no attribute can say the pruned one."""

    def __init__(self) -> None:
        super().__init__()
        del self.hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.proj(x).reshape(x.shape[0], 8, -1).mean(-1))


class Shared(nn.Module):
    """``self.width`` sizes a pruned axis and the (pinned) input axis alike."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x.reshape(-1, self.width)).reshape(-1, self.width, 1)
        return self.b(torch.relu(h).squeeze(-1))


class Pieces(nn.Module):
    """One projection cut in three: ``chunk(3)``, ``split(self.piece)`` or ``split([self.piece] * 3)``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.piece = how, 4
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.qkv(x)
        if self.how == "chunk":
            q, k, v = h.chunk(3, dim=-1)
        else:
            q, k, v = h.split(self.piece if self.how == "split" else [self.piece] * 3, dim=-1)
        return self.out(q * k + v)


def test_a_literal_read_from_an_attribute_is_set_there_and_the_class_kept() -> None:
    model, x = Tokens(), torch.randn(1, 3, 8, 8)
    pruned, simulated = pruned_and_simulated(model, x)
    assert type(pruned) is Tokens and pruned.hidden == 4 and model.hidden == 8
    assert_agree(pruned, simulated, torch.randn(3, 3, 8, 8))
    assert pruned(torch.randn(2, 3, 12, 12)).shape == (2, 2)  # the class runs at any image size


def test_a_literal_no_attribute_holds_returns_the_graph_and_names_it() -> None:
    model, x = Literal(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"not a Literal: pruning changes reshape\(proj, getitem, 8, -1\) -> "
                                         r"reshape\(proj, getitem, 4, -1\) in the forward \(Literal\)"):
        pruned, simulated = pruned_and_simulated(model, x)
    assert isinstance(pruned, fx.GraphModule) and not isinstance(pruned, Literal)
    assert_agree(pruned, simulated, torch.randn(3, 3, 8, 8))


def test_an_attribute_that_also_sizes_an_unpruned_axis_gives_the_graph() -> None:
    model, x = Shared(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match="does not compute what the pruned graph computes"):
        pruned, simulated = pruned_and_simulated(model, x)
    assert isinstance(pruned, fx.GraphModule) and model.width == 8
    assert_agree(pruned, simulated, torch.randn(3, 8))


@pytest.mark.parametrize("how", ["chunk", "split", "sizes"])
def test_equal_pieces_keep_the_call_chunk_or_split(how: str) -> None:
    model, x = Pieces(how), torch.randn(2, 4)
    pruned, simulated = pruned_and_simulated(model, x)
    assert type(pruned) is Pieces and pruned.qkv.out_features == 6 and pruned.piece == (4 if how == "chunk" else 2)
    assert_agree(pruned, simulated, torch.randn(5, 4))


# -- named models ------------------------------------------------------------------------


def tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def timm_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=10)


def timm_swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
                             depths=(2, 2), num_heads=(2, 4), num_classes=10)


def timm_convnext() -> nn.Module:
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def timm_poolformer() -> nn.Module:
    return timm.create_model("poolformer_s12", pretrained=False, num_classes=10)


@pytest.mark.parametrize(("build", "size"), [(tv_vit, 32), (tv_convnext, 32), (timm_vit, 32), (timm_swin, 56),
                                             (timm_convnext, 32), (timm_poolformer, 32)])
def test_named_models_keep_their_class(build: Callable[[], nn.Module], size: int) -> None:
    torch.manual_seed(0)
    model = build()
    pruned, simulated = pruned_and_simulated(model, torch.randn(1, 3, size, size))
    assert isinstance(pruned, type(model)) and not isinstance(pruned, fx.GraphModule)
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert_agree(pruned, simulated, torch.randn(3, 3, size, size))


def test_timm_attention_with_pruned_head_width_runs_unfused_at_the_original_scale() -> None:
    model = timm_vit()
    pruned, simulated = pruned_and_simulated(model, torch.randn(1, 3, 32, 32))
    attention = pruned.blocks[0].attn
    assert attention.head_dim == 8 and attention.fused_attn is False and attention.scale == 16 ** -0.5
    assert model.blocks[0].attn.fused_attn is not False or not timm.layers.use_fused_attn()


def test_shufflenet_halves_of_other_sizes_return_the_graph_saying_why() -> None:
    model, x = torchvision.models.shufflenet_v2_x0_5(weights=None), torch.randn(1, 3, 64, 64)

    def uneven(g: depgraph.Group) -> list[int]:  # keep all but one unit: halves of a chunk(2) then differ
        return list(range(1, g.size))

    with pytest.warns(UserWarning, match=r"not a ShuffleNetV2: pruning changes chunk\(view_1, 2, dim=1\) -> split"):
        pruned, simulated = pruned_and_simulated(model, x, uneven)
    assert isinstance(pruned, fx.GraphModule)
    assert_agree(pruned, simulated, x)


def test_frozen_batch_norm_buffers_are_members_and_the_class_is_kept() -> None:
    # torchvision's detection backbones use FrozenBatchNorm2d, whose forward computes its
    # scale from buffers alone: traced through, fx would fold that into a constant
    from torchvision.ops import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    a = depgraph.analyze(model, torch.randn(1, 3, 4, 4))
    assert [(m.name, m.dim) for m in a.groups[0].members] == [
        ("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("1.running_mean", 0),
        ("1.running_var", 0), ("3.weight", 1)]
    pruned, simulated = pruned_and_simulated(model, torch.randn(1, 3, 4, 4))
    assert type(pruned) is nn.Sequential and pruned[1].running_var.shape == (2,)
    assert_agree(pruned, simulated, torch.randn(3, 3, 5, 5))
