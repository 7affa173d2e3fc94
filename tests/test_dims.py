"""The axis algebra on its own: unification, refinement, pinning, removed indices."""

import torch

from passes.dims import ONE, Atom, Concat, Product, Unifier, removed_mask


def test_merge_then_pin_propagates_to_the_class():
    u = Unifier()
    a, b, c = u.new(4), u.new(4), u.new(4)
    u.unify(a, b)
    u.unify(b, c)
    assert u.root(a) == u.root(c)
    u.pin(c, "model output")
    assert u.pin_reason(a) == "model output"


def test_atom_equal_to_product_is_refined_everywhere():
    u = Unifier()
    hidden, heads, hd = u.new(12), u.new(3), u.new(4)
    u.unify(hidden, Product((heads, hd)))
    assert u.resolve(hidden) == Product((u.root(heads), u.root(hd)))


def test_products_align_by_splitting_the_coarser_factor():
    u = Unifier()
    a, b = u.new(4), u.new(6)
    c, d = u.new(8), u.new(3)
    u.unify(Product((a, b)), Product((c, d)))  # reshape (4, 6) -> (8, 3)
    left, right = u.resolve(Product((a, b))), u.resolve(Product((c, d)))
    assert left == right
    assert [f.size for f in left.factors] == [4, 2, 3]
    assert u.pin_reason(a) is None and u.pin_reason(d) is None


def test_misaligned_reshape_pins_the_stretch_only():
    u = Unifier()
    batch, x, y = u.new(5), u.new(6), u.new(4)
    batch2, p, q = u.new(5), u.new(4), u.new(6)
    u.unify(Product((batch, x, y)), Product((batch2, p, q)))  # (5, 6, 4) -> (5, 4, 6)
    assert u.root(batch) == u.root(batch2) and u.pin_reason(batch) is None
    assert all(u.pin_reason(t) is not None for t in (x, y, p, q))


def test_concat_against_atom_splits_it_into_parts():
    u = Unifier()
    conv_out, first, second = u.new(10), u.new(4), u.new(6)
    u.unify(conv_out, Concat((first, second)))
    assert u.resolve(conv_out) == Concat((u.root(first), u.root(second)))


def test_product_with_leading_size_three_matches_three_equal_parts():
    u = Unifier()
    three, heads, hd = u.new(3, "literal 3 in a reshape"), u.new(2), u.new(4)
    q, k, v = u.new(8), u.new(8), u.new(8)
    u.unify(Product((three, heads, hd)), Concat((q, k, v)))  # fused qkv, reshape and chunk
    assert u.resolve(q) == u.resolve(k) == u.resolve(v) == Product((u.root(heads), u.root(hd)))
    assert u.pin_reason(heads) is None


def test_equating_axes_of_different_sizes_pins_both():
    u = Unifier()
    a, c = u.new(2), u.new(4)
    u.unify(a, c)
    assert "different sizes" in u.pin_reason(a) and "different sizes" in u.pin_reason(c)


def test_size_one_is_never_prunable_and_vanishes_from_products():
    u = Unifier()
    a = u.new(5)
    assert u.new(1) is ONE
    assert u.resolve(Product((ONE, a, ONE))) == a
    assert u.pin_reason(ONE) is not None


def test_removed_mask_through_product_and_concat():
    u = Unifier()
    h, d, extra = u.new(2), u.new(3), u.new(2)
    assert isinstance(h, Atom)
    expr = Concat((Product((h, d)), extra))
    assert removed_mask(expr, h, torch.tensor([1])).nonzero().flatten().tolist() == [3, 4, 5]
    assert removed_mask(expr, d, torch.tensor([0, 2])).nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert removed_mask(expr, extra, torch.tensor([1])).nonzero().flatten().tolist() == [7]
