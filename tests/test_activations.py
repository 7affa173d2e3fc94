"""Activation statistics and the criteria on them (Wanda-sp, FLAP), bias compensation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO, Branchy, tiny_llama

import depgraph


def _mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).eval()


def _batches(shape: tuple[int, ...], n: int = 3, shift: float = 0.5) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) + shift for i in range(n)]


def test_wanda_and_flap_by_hand() -> None:
    """The hidden units are scored by the consumer (``2.weight``, axis 1) only: Wanda-sp sums
    ``|w| · rms(h)`` over its rows, FLAP ``w² · var(h)`` (unbiased over every position seen)."""
    model, batches = _mlp(), _batches((5, 3))
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for x in batches])  # the consumer's inputs, 15 positions
    w = model[2].weight.detach()
    wanda = (w.abs() * hidden.square().mean(0).sqrt()).sum(0)
    flap = (w.square() * hidden.var(0)).sum(0)
    a = depgraph.analyze(model, torch.zeros(1, 3))
    for kind, by_unit in (("activation", wanda), ("fluctuation", flap)):
        scores = depgraph.activation_importance(model, batches, kind=kind)
        assert sorted(scores) == ["0.weight", "2.weight"] and scores.reads == {"0.weight": 1, "2.weight": 1}
        kept = depgraph.solve(a, 0.5, importance=scores).keep[0]
        assert kept.tolist() == sorted(by_unit.argsort()[3:].tolist()), kind
    stats = depgraph.activation_stats(model, batches)
    torch.testing.assert_close(stats["2.weight"].mean.flatten(), hidden.mean(0))
    torch.testing.assert_close(stats["2.weight"].var.flatten(), hidden.var(0))
    assert stats["2.weight"].count == 15 and stats["2.weight"].dim == 1


def test_grouped_and_transposed_convolutions_read_their_own_channels() -> None:
    x = torch.randn(2, 4, 5, 5) + torch.arange(4.0).reshape(1, 4, 1, 1) * 10
    means = x.mean((0, 2, 3))
    grouped = depgraph.activation_stats(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), [x])["0.weight"]
    # output channels 0-2 read inputs 0-1, outputs 3-5 read inputs 2-3: entry (o, i) reads 2 * (o // 3) + i
    expected = torch.stack([means[2 * (o // 3):2 * (o // 3) + 2] for o in range(6)])
    torch.testing.assert_close(grouped.mean.expand(6, 2, 3, 3), expected[:, :, None, None].expand(6, 2, 3, 3))
    transposed = depgraph.activation_stats(nn.Sequential(nn.ConvTranspose2d(4, 2, 3)), [x])["0.weight"]
    torch.testing.assert_close(transposed.mean.expand(4, 2, 3, 3), means[:, None, None, None].expand(4, 2, 3, 3))
    assert (grouped.dim, transposed.dim, grouped.count) == (1, 0, 2 * 25)


def test_bias_compensation_keeps_the_mean_output() -> None:
    """With only the consumer's inputs removed, the compensated pruned model's mean output over
    the calibration data is the unpruned model's; it differs from the plain pruned model by the
    removed channels' mean contribution, at every input."""
    model, batches = _mlp(), _batches((8, 3))
    a = depgraph.analyze(model, torch.zeros(1, 3))
    plan = depgraph.Plan.from_keep(a, {0: [0, 2, 5]})
    stats = depgraph.activation_stats(model, batches)
    plain, compensated = depgraph.prune(model, plan), depgraph.prune(model, plan, compensate=stats)
    assert model[2].weight.shape == (2, 6)  # the caller's model is untouched
    x = torch.cat(batches)
    with torch.no_grad():
        hidden = model[1](model[0](x))
        shift = model[2].weight[:, [1, 3, 4]] @ hidden[:, [1, 3, 4]].mean(0)
        torch.testing.assert_close(compensated(x), plain(x) + shift)
        torch.testing.assert_close(compensated(x).mean(0), model(x).mean(0))
        torch.testing.assert_close(depgraph.simulate(model, plan)(x), plain(x))


def test_bias_compensation_creates_a_bias_and_follows_pruned_outputs() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 2)).eval()
    batches = _batches((8, 4))
    a = depgraph.analyze(model, torch.zeros(1, 4))
    plan = depgraph.Plan.from_keep(a, {0: [0, 1, 2], 1: [1, 3]})
    pruned = depgraph.prune(model, plan, compensate=depgraph.activation_stats(model, batches))
    x = torch.cat(batches)
    with torch.no_grad():
        h = model[1](model[0](x))
        expected = model[2].weight[:, 3:] @ h[:, 3:].mean(0)
    assert pruned[0].bias is None and pruned[2].bias.shape == (2,) and pruned[4].bias.shape == (2,)
    torch.testing.assert_close(pruned[2].bias.detach(), expected[[1, 3]])


class _TiedHead(nn.Module):
    """An embedding whose weight the output layer reads too (``head.weight`` is ``emb.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h + torch.relu(self.fc(h)))


def test_a_tied_weight_is_scored_and_compensated_under_its_first_name() -> None:
    """The statistics of ``head.weight`` (what the output layer reads) score the tied tensor
    under the name the analysis gives it, ``emb.weight``, along the hidden axis; compensation
    of the removed hidden channels reaches the output layer."""
    torch.manual_seed(4)
    model = _TiedHead().eval()
    batches = [torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = depgraph.activation_stats(model, batches)
    scores = depgraph.activation_importance(model, stats)
    assert sorted(scores) == ["emb.weight", "fc.weight"] and scores.reads == {"emb.weight": 1, "fc.weight": 1}
    torch.testing.assert_close(scores["emb.weight"], model.emb.weight.detach().abs() * stats["head.weight"].rms)
    a = depgraph.analyze(model, batches[0])
    hidden = next(g.index for g in a.groups if ("emb.weight", 1) in {(m.name, m.dim) for m in g.members})
    plan = depgraph.solve(a, {hidden: 0.5}, importance=scores)
    readers = [m for m in a.groups[hidden].members if (m.name, m.dim) in {("emb.weight", 1), ("fc.weight", 1)}]
    by_unit = sum(m.unit_sums(scores[m.name]) for m in readers) / 2
    assert plan.keep[hidden].tolist() == sorted(by_unit.argsort()[3:].tolist())
    compensated = depgraph.prune(model, plan, compensate=stats)
    x, removed = torch.cat(batches), sorted(set(range(6)) - set(plan.keep[hidden].tolist()))
    with torch.no_grad():
        h = model.emb(x)
        into_head = h + torch.relu(model.fc(h))
        shift = model.head.weight[:, removed] @ into_head.reshape(-1, 6)[:, removed].mean(0)
        torch.testing.assert_close(compensated.head.bias, shift)
        assert compensated.head.weight is compensated.emb.weight


def test_wanda_as_a_callable_matches_the_built_in_criterion() -> None:
    model, x = ZOO["residual"].factory().eval(), ZOO["residual"].example_inputs()
    batches = [tuple(t + 0.1 * i for t in x) for i in range(2)]
    a = depgraph.analyze(model, x)
    stats = depgraph.activation_stats(model, batches)

    def wanda(group, tensors, stats):  # as in the README
        readers = [m for m in group.members if m.name in stats and stats[m.name].dim == m.dim]
        return sum(m.unit_sums(tensors[m.name].abs() * stats[m.name].rms) for m in readers) / len(readers)

    built_in = depgraph.solve(a, 0.5, importance=depgraph.activation_importance(model, stats))
    called = depgraph.solve(a, 0.5, importance=stats.criterion(wanda))
    assert built_in.keep.keys() == called.keep.keys() and built_in.keep
    assert all(torch.equal(built_in.keep[i], called.keep[i]) for i in built_in.keep)


def test_a_batch_norm_cnn_is_left_as_it_was_and_scores_are_deterministic() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches((4, 3, 6, 6))
    first = depgraph.activation_importance(model, batches, kind="fluctuation")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert not any(m._forward_pre_hooks for m in model.modules())
    again = depgraph.activation_importance(model, batches, kind="fluctuation")
    assert all(torch.equal(first[k], again[k]) and first[k].shape == model.get_parameter(k).shape for k in first)


def test_llama_through_export_with_keyword_batches_and_compensation() -> None:
    model = tiny_llama()
    ids = [torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    a = depgraph.analyze(model, {"input_ids": ids[0], "use_cache": False})
    stats = depgraph.activation_stats(model, [{"input_ids": x} for x in ids])
    assert stats["model.layers.0.mlp.down_proj.weight"].count == 3 * 14
    scores = depgraph.activation_importance(model, stats)
    mlp = next(g.index for g in a.groups if g.layers[0].endswith("gate_proj"))
    plan = depgraph.solve(a, {mlp: 0.5}, importance=scores)
    plain, compensated = depgraph.prune(model, plan), depgraph.prune(model, plan, compensate=stats)
    assert type(compensated) is type(model) and compensated.model.layers[0].mlp.down_proj.bias.shape == (32,)
    with torch.no_grad():
        full, before, after = (m(torch.cat(ids)).logits for m in (model, plain, compensated))
    assert (after - full).mean((0, 1)).abs().mean() < (before - full).mean((0, 1)).abs().mean()
    # uneven head sizes: the pruned model is the rewritten graph, whose linear ops read no bias
    uneven = depgraph.solve(a, target={"macs": 0.6}, importance=scores)
    with pytest.warns(UserWarning, match="bias compensation left out model.layers.0"):
        depgraph.prune(model, uneven, compensate=stats)


def test_a_recorded_model() -> None:
    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(4, 8)
    a = depgraph.analyze(model, x, tracer="record")
    with torch.no_grad():
        y = model.a(x)
        h = y if y.sum() > 0 else -y
    wanda = (model.b.weight.abs() * h.square().mean(0).sqrt()).sum(0).detach()
    plan = depgraph.solve(a, 0.5, importance=depgraph.activation_importance(model, [x]))
    assert plan.keep[0].tolist() == sorted(wanda.argsort()[3:].tolist())


def test_progress_counts_batches(capsys: pytest.CaptureFixture[str]) -> None:
    depgraph.activation_stats(_mlp(), _batches((2, 3)), progress=True)
    assert "activation statistics" in capsys.readouterr().err.replace("\r", "\n").split("3/3")[0]
    depgraph.activation_stats(_mlp(), iter(_batches((2, 3))), progress=False)
    assert capsys.readouterr().err == ""


def test_clear_errors() -> None:
    with pytest.raises(depgraph.InputError, match="kind must be one of activation, fluctuation"):
        depgraph.activation_importance(_mlp(), [torch.zeros(1, 3)], kind="wanda")
    with pytest.raises(depgraph.InputError, match="has no nn.Linear or convolution"):
        depgraph.activation_stats(nn.Sequential(nn.ReLU()), [torch.zeros(1, 3)])
    with pytest.raises(depgraph.InputError, match="batches gave no batch"):
        depgraph.activation_stats(_mlp(), [])
    other = depgraph.activation_stats(nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(2, 2)),
                                      [torch.zeros(1, 3)])
    with pytest.raises(depgraph.InputError, match="statistics of 1.weight .*collect them on this model"):
        depgraph.activation_importance(_mlp(), other)
    a = depgraph.analyze(_mlp(), torch.zeros(1, 3))
    with pytest.raises(depgraph.InputError, match="statistics of 1.weight"):
        depgraph.prune(_mlp(), depgraph.solve(a, 0.5), compensate=other)
