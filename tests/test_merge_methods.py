"""Merge operators against hand computations and independent references: the counter-based masks
against a pure-Python evaluation of their formula, the radix select against kthvalue,
Breadcrumbs against a sort-based implementation of mergekit 0.1.5's rule, DELLA's keep
probabilities, masks and rescaling by hand, and chunking independence."""

import pytest
import torch

import map_merge as mm
from map_merge import merge_methods
from map_merge.merge_methods import masks, select

MASK32 = (1 << 32) - 1


def python_word(seed, stream, key, task, index):
    """The documented hash, in plain Python integers (mod 2**32, logical shifts)."""
    x = ((index % (1 << 31)) * 0x9E3779B9 + masks._seed32(seed, stream, key, task, index >> 31)) & MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x - (1 << 32) if x >> 31 else x


def fit_one(method, deltas, shape=None):
    """A method's state for one tensor ``deltas: (T, *shape)`` seen as a single chunk."""
    shape = tuple(deltas.shape[1:]) if shape is None else shape
    flat = deltas.reshape(deltas.shape[0], -1)
    return method.fit(lambda keys=None: iter([("w", 0, flat)]), {"w": flat.shape[1]}, {"w": shape}), flat


# ---------------------------------------------------------------------- masks
def test_words_equal_the_formula_in_python_integers():
    # indices near 0, around int32 overflow of the products, and across the 2**31 window
    for start in [0, 5, 2**20 + 3, 2**31 - 2, 3 * 2**31 + 7]:
        words = masks.random_words(11, "dare", "layer.0.weight", start, 4, 3)
        assert words.dtype == torch.int32
        for t in range(3):
            assert words[t].tolist() == [python_word(11, "dare", "layer.0.weight", t, start + j) for j in range(4)], (start, t)


def test_masks_do_not_depend_on_chunk_boundaries():
    dare = mm.Dare(p=0.3, seed=4)
    whole = dare.keep_mask("k", 100, 3, 5000)
    for cuts in ([0, 1, 999, 1000, 4096, 5000], [0, 2500, 5000], [0, 4999, 5000]):
        pieces = [dare.keep_mask("k", 100 + a, 3, b - a) for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(pieces, dim=1), whole)
    assert not torch.equal(dare.keep_mask("other", 100, 3, 5000), whole)
    # drop rate and independence of tasks: counts within 4 binomial standard deviations
    big = mm.Dare(p=0.3, seed=1).keep_mask("k", 0, 2, 200_000).float()
    assert (big.mean(1) - 0.7).abs().max() < 4 * (0.21 / 200_000) ** 0.5
    both = (big[0] * big[1]).mean()
    assert abs(both - 0.49) < 4 * (0.49 * 0.51 / 200_000) ** 0.5


def test_dare_drops_at_the_stated_threshold_and_rescales():
    v = torch.randn(2, 3000)
    out = mm.Dare(p=0.25, seed=9).prepare(v)
    words = masks.random_words(9, "dare", "", 0, 3000, 2)
    kept = words >= round(0.25 * 2**32) - 2**31
    torch.testing.assert_close(out, torch.where(kept, v / 0.75, 0.0), rtol=0, atol=0)
    assert torch.equal(mm.Dare(p=0.0).prepare(v), v)
    assert mm.Dare(p=0.5).spec["draw"] == "index-hash-v1"


@pytest.mark.parametrize("method", [mm.Dare(p=0.4, seed=2), mm.Dare(p=0.3, seed=1, ties=mm.Ties(k=0.3)), mm.Ties(k=0.25),
                                    mm.Breadcrumbs(0.6, 0.1, rescale="l1", consensus="sum", normalize=True)],
                         ids=["dare", "dare-ties", "ties", "breadcrumbs"])
def test_cache_sized_tiles_change_nothing(monkeypatch, method):
    from map_merge.merge_methods import base

    v = torch.randn(3, 10_000)
    whole = method.prepare(v)
    monkeypatch.setattr(base, "TILE_ELEMENTS", 3000)  # tiles of 1024 columns, the last one partial
    assert torch.equal(method.prepare(v), whole)
    scratch = v.clone()
    state = method.fit(lambda keys=None: iter([("", 0, v)]), {"": 10_000}, {"": (10_000,)})
    assert method.transform_("", 0, scratch, state) is scratch and torch.equal(scratch, whole)  # in place


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_and_operators_are_the_same_on_cuda():
    v = torch.randn(3, 4096)
    for method in [mm.Dare(p=0.4, seed=2), mm.Della(0.5, 0.2, seed=3), mm.Breadcrumbs(0.7, 0.05)]:
        state, flat = fit_one(method, v, (64, 64))
        on_cpu = method.transform("w", 0, flat, state)
        on_cuda = method.transform("w", 0, flat.cuda(), state)
        assert on_cuda.device.type == "cuda"
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=0)


# ---------------------------------------------------------------------- radix select
@pytest.mark.parametrize("compact", [True, False], ids=["select-in-bin", "sentinel-bin"])
def test_radix_select_several_ranks_equals_kthvalue(monkeypatch, compact):
    monkeypatch.setattr(select, "_compact", lambda device: compact)
    torch.manual_seed(0)
    data = torch.randn(3, 5000)
    data[1, :2000] = 0.5  # many ties
    data[2] = data[2].round(decimals=1)
    ranks = torch.tensor([[1, 4999], [7, 2500], [5000, 3]])
    got = merge_methods.kth_largest_magnitude(lambda: iter(data.split(333, dim=1)), ranks)
    sorted_desc = data.abs().sort(dim=1, descending=True).values
    assert torch.equal(got, sorted_desc.gather(1, ranks - 1))
    with pytest.raises(ValueError, match="exceeds the number of entries"):
        merge_methods.kth_largest_magnitude(lambda: iter([data]), torch.tensor([5001, 1, 1]))


# ---------------------------------------------------------------------- Breadcrumbs
def mergekit_breadcrumbs(x, density, gamma):
    """mergekit 0.1.5's magnitude_outliers: sort |x| ascending, keep positions [bottom, bottom + kept)."""
    n = x.numel()
    kept, top = int(density * n), int(gamma * n)
    bottom = max(0, n - kept - top)
    mask = torch.zeros(n)
    mask[torch.sort(x.abs().reshape(-1)).indices[bottom : bottom + kept]] = 1
    return x * mask.view_as(x)


def test_breadcrumbs_keep_set_by_hand():
    # |x| ascending: 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0; density 0.5, gamma 0.2:
    # kept 5, top 2 dropped (1.0, 0.9), bottom 3 dropped (0.1, 0.2, 0.3) -> 0.4 .. 0.8 kept
    x = torch.tensor([[0.5, -1.0, 0.1, -0.4, 0.9, 0.3, -0.7, 0.2, 0.8, -0.6]])
    out = mm.Breadcrumbs(density=0.5, gamma=0.2).prepare(x)
    assert torch.equal(out, torch.tensor([[0.5, 0.0, 0.0, -0.4, 0.0, 0.0, -0.7, 0.0, 0.8, -0.6]]))
    # gamma + density > 1: the kept share wins, fewer large entries go (density 0.9, gamma 0.2: only 1.0 dropped)
    assert (mm.Breadcrumbs(density=0.9, gamma=0.2).prepare(x) == torch.where(x.abs() < 1.0, x, 0.0)).all()
    assert torch.equal(mm.Breadcrumbs(density=1.0, gamma=0.3).prepare(x), x)  # mergekit: density 1 keeps all
    # L1 rescale: the kept entries scaled by sum|x| / sum|kept| = 5.5 / 3.0
    scaled = mm.Breadcrumbs(density=0.5, gamma=0.2, rescale="l1").prepare(x)
    torch.testing.assert_close(scaled, out * (5.5 / 3.0))


def test_breadcrumbs_equals_the_mergekit_rule_per_tensor_and_per_model():
    torch.manual_seed(1)
    a, b = torch.randn(3, 40, 25), torch.randn(3, 300)
    method = mm.Breadcrumbs(density=0.37, gamma=0.06)
    shapes = {"a": (40, 25), "b": (300,)}
    chunks = lambda keys=None: iter([(k, 0, t) for k, t in (("a", a.reshape(3, -1)), ("b", b)) if keys is None or k in keys])  # noqa: E731
    state = method.fit(chunks, {"a": 1000, "b": 300}, shapes)
    for key, t in (("a", a), ("b", b)):
        got = method.transform(key, 0, t.reshape(3, -1), state)
        expected = torch.stack([mergekit_breadcrumbs(t[i], 0.37, 0.06).reshape(-1) for i in range(3)])
        assert torch.equal(got, expected), key
    # scope global: the same rule over each whole task vector
    glob = mm.Breadcrumbs(density=0.37, gamma=0.06, scope="global")
    state = glob.fit(chunks, {"a": 1000, "b": 300}, shapes)
    got = torch.cat([glob.transform(k, 0, t.reshape(3, -1), state) for k, t in (("a", a), ("b", b))], dim=1)
    whole = torch.cat([a.reshape(3, -1), b], dim=1)
    assert torch.equal(got, torch.stack([mergekit_breadcrumbs(row, 0.37, 0.06) for row in whole]))


def test_breadcrumbs_sign_consensus_elects_plus_on_a_zero_sum():
    x = torch.tensor([[1.0, 2.0, -3.0], [-1.0, 2.0, 1.0]])
    out = mm.Breadcrumbs(density=1.0, consensus="sum").prepare(x)
    # sums [0, 4, -2] -> signs [+, +, -]: agreeing entries kept, not divided
    assert torch.equal(out, torch.tensor([[1.0, 2.0, -3.0], [0.0, 2.0, 0.0]]))
    mean = mm.Breadcrumbs(density=1.0, consensus="sum", normalize=True).prepare(x)
    assert torch.equal(mean, torch.tensor([[1.0, 1.0, -3.0], [0.0, 1.0, 0.0]]))


# ---------------------------------------------------------------------- DELLA
def test_della_keep_probabilities_by_hand():
    # rows ranked by |x|: row 0 [0.1, -0.4, 0.3, 0.2] -> ranks 0, 3, 2, 1 of 3; row 1 [-2, 1, 0, 3] -> 2, 1, 0, 3
    x = torch.tensor([[[0.1, -0.4, 0.3, 0.2], [-2.0, 1.0, 0.0, 3.0]]])
    della = mm.Della(density=0.5, epsilon=0.2)
    state, flat = fit_one(della, x)
    probs = della.keep_probabilities("w", 0, flat, state)
    rank_norm = torch.tensor([[0.0, 3.0, 2.0, 1.0, 2.0, 1.0, 0.0, 3.0]]) / 3.0
    assert torch.equal(probs, (0.5 - 0.2) + rank_norm * 2 * 0.2)  # mergekit's expression, fp32
    assert probs.min() == pytest.approx(0.3) and probs.max() == pytest.approx(0.7)
    # a row of one entry (mergekit fails there): the mean probability
    state1, flat1 = fit_one(della, torch.tensor([[[1.0], [2.0]]]))
    torch.testing.assert_close(della.keep_probabilities("w", 0, flat1, state1), torch.full((1, 2), 0.5))


def test_della_ranks_3d_tensors_along_dimension_1_as_mergekit(monkeypatch):
    # a (2, 3, 2) tensor: mergekit's della_magprune ranks entry [i, j, k] among [i, :, k] (argsort on dim 1),
    # not among the 6 entries of x[i]. By hand, per (i, k) column of 3:
    #   i=0 k=0 |0.1, 0.3, 0.2| -> 0, 1, .5   k=1 |5, 2, 1| -> 1, .5, 0
    #   i=1 k=0 |4, 1, 2|       -> 1, 0, .5   k=1 |0, .5, .25| -> 0, 1, .5
    x = torch.tensor([[[[0.1, -5.0], [0.3, 2.0], [-0.2, 1.0]], [[4.0, 0.0], [-1.0, 0.5], [2.0, -0.25]]]])
    della = mm.Della(density=0.5, epsilon=0.2)
    state, flat = fit_one(della, x)
    rank_norm = torch.tensor([[0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5]])
    probs = della.keep_probabilities("w", 0, flat, state)
    assert torch.equal(probs, (0.5 - 0.2) + rank_norm * 2 * 0.2)
    # against mergekit's own expression on a random 3-d tensor: argsort(argsort(|x|, dim=1), dim=1) / (n1 - 1)
    torch.manual_seed(8)
    y = torch.randn(2, 3, 5, 4)
    state, flat = fit_one(della, y)
    expected = y.abs().argsort(dim=2).argsort(dim=2).float() / 4
    assert torch.equal(della.keep_probabilities("w", 0, flat, state), (0.5 - 0.2) + expected.reshape(2, -1) * 2 * 0.2)
    # rows of 20 cut into chunks of 8: ranked in fit, the same probabilities
    monkeypatch.setattr(merge_methods, "CHUNK", 8)
    pieces = [(s, flat[:, s : s + 8]) for s in range(0, 60, 8)]
    cut = della.fit(lambda keys=None: iter([("w", s, d) for s, d in pieces]), {"w": 60}, {"w": (3, 5, 4)})
    assert torch.equal(torch.cat([della.keep_probabilities("w", s, d, cut) for s, d in pieces], 1),
                       (0.5 - 0.2) + expected.reshape(2, -1) * 2 * 0.2)
    # a dimension 1 of size one: every entry alone, the mean probability (mergekit divides by zero there)
    state1, flat1 = fit_one(della, torch.randn(1, 2, 1, 3))
    torch.testing.assert_close(della.keep_probabilities("w", 0, flat1, state1), torch.full((1, 6), 0.5))


def test_della_mask_is_seeded_and_rescaled():
    torch.manual_seed(3)
    x = torch.randn(2, 50, 40)
    plain = mm.Della(density=0.6, epsilon=0.1, seed=5, rescale=None, consensus=None, normalize=False)
    state, flat = fit_one(plain, x)
    out = plain.transform("w", 0, flat, state)
    probs = plain.keep_probabilities("w", 0, flat, state)
    words = masks.random_words(5, "della", "w", 0, flat.shape[1], 2)
    kept = masks.uniform24(words).double() / 2**24 < probs.double()  # Bernoulli(probs) from the words
    assert torch.equal(out, torch.where(kept, flat, 0.0))
    again = plain.transform("w", 0, flat, plain.fit(lambda keys=None: iter([("w", 0, flat)]), {"w": 2000}, {"w": (50, 40)}))
    assert torch.equal(again, out)
    other = mm.Della(density=0.6, epsilon=0.1, seed=6, rescale=None, consensus=None, normalize=False)
    assert not torch.equal(other.transform("w", 0, flat, fit_one(other, x)[0]), out)
    assert abs(kept.float().mean().item() - 0.6) < 0.02
    # mergekit's rescale: the L1 norm of each task's pruned tensor matched to the unpruned one
    l1 = mm.Della(density=0.6, epsilon=0.1, seed=5, consensus=None, normalize=False)
    state, _ = fit_one(l1, x)
    factor = flat.abs().sum(1, keepdim=True) / out.abs().sum(1, keepdim=True)
    torch.testing.assert_close(l1.transform("w", 0, flat, state), out * factor, rtol=1e-6, atol=0)
    # the paper's rescale: divide by the keep probability
    inverse = mm.Della(density=0.6, epsilon=0.1, seed=5, rescale="inverse", consensus=None, normalize=False)
    torch.testing.assert_close(inverse.transform("w", 0, flat, fit_one(inverse, x)[0]), torch.where(kept, flat / probs, 0.0))


def test_della_inverse_rescale_is_unbiased_over_seeds():
    torch.manual_seed(4)
    x = torch.randn(1, 20, 30)
    runs = []
    for seed in range(200):
        method = mm.Della(density=0.5, epsilon=0.2, seed=seed, rescale="inverse", consensus=None, normalize=False)
        state, flat = fit_one(method, x)
        runs.append(method.transform("w", 0, flat, state))
    runs = torch.stack(runs)
    probs = method.keep_probabilities("w", 0, flat, state)
    error = (runs.mean(0) - flat) / (flat.abs() * ((1 - probs) / probs / 200).sqrt())  # in standard errors
    assert error.abs().max() < 5 and error.pow(2).mean() < 1.5


def test_della_global_ranks_follow_the_whole_model():
    torch.manual_seed(5)
    x = torch.randn(2, 20000) * torch.logspace(-3, 0, 20000)
    della = mm.Della(density=0.5, epsilon=0.25, scope="global", rescale=None, consensus=None, normalize=False)
    chunks = lambda keys=None: iter([("a", 0, x[:, :7000]), ("b", 0, x[:, 7000:])])  # noqa: E731
    state = della.fit(chunks, {"a": 7000, "b": 13000}, {"a": (7000,), "b": (13000,)})
    probs = torch.cat([della.keep_probabilities("a", 0, x[:, :7000], state), della.keep_probabilities("b", 0, x[:, 7000:], state)], 1)
    exact = x.abs().argsort(1).argsort(1).float() / (x.shape[1] - 1)
    assert (probs - (0.25 + exact * 0.5)).abs().max() < 0.01  # histogram ranks: within a bin's share


def test_della_rows_longer_than_a_chunk(monkeypatch):
    torch.manual_seed(6)
    x = torch.randn(2, 6, 50)
    della = mm.Della(density=0.4, epsilon=0.1, seed=1)
    whole, flat = fit_one(della, x)
    expected = della.transform("w", 0, flat, whole)
    monkeypatch.setattr(merge_methods, "CHUNK", 16)  # rows of 50 are cut into pieces
    pieces = [(s, flat[:, s : s + 16]) for s in range(0, 300, 16)]
    chunks = lambda keys=None: iter([("w", s, d) for s, d in pieces])  # noqa: E731
    state = della.fit(chunks, {"w": 300}, {"w": (6, 50)})
    # the same masks; the L1 factors summed in another order (float64) agree to fp32 rounding
    torch.testing.assert_close(torch.cat([della.transform("w", s, d, state) for s, d in pieces], 1), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="cuts a row of 50"):
        della.transform("w", 3, flat[:, 3:19], {**whole, "ranks": {}})


def test_operators_pickle_without_their_scratch_buffers():
    import copy
    import pickle

    dare = mm.Dare(p=0.3, seed=2)
    v = torch.randn(2, 5000)
    out = dare.prepare(v)
    assert dare.__dict__.get("_workspace") is not None  # scratch kept between calls
    for clone in (pickle.loads(pickle.dumps(dare)), copy.deepcopy(dare)):
        assert clone == dare and "_workspace" not in clone.__dict__
        assert torch.equal(clone.prepare(v), out)
    assert len(pickle.dumps(dare)) < 1000


# ---------------------------------------------------------------------- names and validation
def test_names_resolve_and_bad_settings_are_named():
    assert isinstance(merge_methods.resolve_method("breadcrumbs"), mm.Breadcrumbs)
    assert isinstance(merge_methods.resolve_method("della"), mm.Della)
    from map_merge.config import CHOICES

    assert set(merge_methods.METHOD_NAMES) <= set(CHOICES["method"])
    for make, message in [
        (lambda: mm.Breadcrumbs(density=0.0), "Breadcrumbs.density"),
        (lambda: mm.Breadcrumbs(gamma=1.0), "Breadcrumbs.gamma"),
        (lambda: mm.Breadcrumbs(scope="layer"), "Breadcrumbs.scope"),
        (lambda: mm.Breadcrumbs(rescale="l2"), "Breadcrumbs.rescale"),
        (lambda: mm.Breadcrumbs(normalize=True), "needs consensus='sum'"),
        (lambda: mm.Della(density=0.9, epsilon=0.15), "density \\+/- epsilon"),
        (lambda: mm.Della(rescale="l2"), "Della.rescale"),
        (lambda: mm.Della(consensus="count"), "Della.consensus"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="needs the tensors' shapes"):
        mm.Della().fit(lambda keys=None: iter([]), {"w": 3})
