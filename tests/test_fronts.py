import itertools

import numpy as np
import pytest

import map_merge as mm


def brute_mask(points):
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if (points[j] >= points[i]).all() and (points[j] > points[i]).any():
                mask[i] = False
    return mask


def brute_hv(points, ref):
    """Exact hypervolume by summing the cells of the coordinate grid that are dominated."""
    pts = points[(points > ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.concatenate([[r], pts[:, d]])) for d, r in enumerate(ref)]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        upper = np.array([axes[d][i + 1] for d, i in enumerate(cell)])
        if (pts >= upper).all(axis=1).any():
            total += np.prod([axes[d][i + 1] - axes[d][i] for d, i in enumerate(cell)])
    return total


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_pareto_mask_and_hypervolume_against_brute_force(dim, seed):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(size=(14 if dim < 4 else 9, dim))
    pts[3] = pts[2]  # a duplicate
    np.testing.assert_array_equal(mm.pareto_mask(pts), brute_mask(pts))
    ref = np.full(dim, 0.1)
    assert mm.hypervolume(pts, ref) == pytest.approx(brute_hv(pts, ref), rel=1e-12, abs=1e-15)


def test_hypervolume_hand_computed():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert mm.hypervolume(pts, np.zeros(2)) == pytest.approx(6.0)
    assert mm.hypervolume(pts, np.array([5.0, 5.0])) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_distance_indicators_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, ref = rng.uniform(size=(7, 3)), rng.uniform(size=(11, 3))
    d = lambda x, y: np.sqrt(((x - y) ** 2).sum())
    assert mm.igd(a, ref) == pytest.approx(np.mean([min(d(z, p) for p in a) for z in ref]))
    assert mm.gd(a, ref) == pytest.approx(np.mean([min(d(p, z) for z in ref) for p in a]))
    plus = lambda z, p: np.sqrt((np.maximum(z - p, 0) ** 2).sum())
    assert mm.igd_plus(a, ref) == pytest.approx(np.mean([min(plus(z, p) for p in a) for z in ref]))
    dominated = [any((p >= q).all() and (p > q).any() for p in a) for q in ref]
    assert mm.win_rate(a, ref) == pytest.approx(np.mean(dominated))
    front = ref[mm.pareto_mask(ref)]
    assert mm.igd_plus(front, front) == 0.0 and mm.win_rate(front, front) == 0.0
    assert mm.win_rate(ref + 1.0, ref) == 1.0


def test_front_selection():
    front = mm.ParetoFront(
        coeffs=[[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]],
        metrics=[[0.6, 0.9], [0.8, 0.8], [0.9, 0.5]],
        task_names=("a", "b"),
    )
    np.testing.assert_array_equal(front.select([1, 0]), [1.0, 0.0])
    np.testing.assert_array_equal(front.select([0, 3]), [0.0, 1.0])
    np.testing.assert_array_equal(front.select([1, 1]), [0.5, 0.5])
    np.testing.assert_array_equal(front.nearest([0.62, 0.88]), [0.0, 1.0])
    assert len(front.meeting([0.7, None])) == 2
    with pytest.raises(ValueError, match="no front point meets"):
        front.meeting([0.95, None])
    with pytest.raises(ValueError, match="non-negative"):
        front.select([-1, 1])
    with pytest.raises(ValueError, match="all zero"):
        front.select([0, 0])
    with pytest.raises(ValueError, match="3 weights but there are 2 tasks"):
        front.select([1, 1, 1])
    with pytest.raises(ValueError, match="empty Pareto front"):
        mm.ParetoFront(np.zeros((0, 2)), np.zeros((0, 2)), ("a", "b"))
    loss_front = mm.ParetoFront([[0.0], [1.0]], [[0.2, 0.9], [0.1, 0.5]], ("loss", "acc"), ("min", "max"))
    np.testing.assert_array_equal(loss_front.select([1, 0]), [1.0])  # lowest loss
