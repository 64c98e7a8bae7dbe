"""MAP's default adaptive sampling: budgets, designs, picks, asynchronous workers, the GP model
and the acquisition, each against an analytic ground truth."""

import time
import warnings

import numpy as np
import pytest

import map_merge as mm
from map_merge.acquisition import propose_ehvi
from map_merge.baselines import random_search
from map_merge.gp_model import GPModel


def unit_quadratics(c):
    """f_i(c) = 1 - |c - e_i|^2 (T = 2). The Pareto set is the segment c = (a, 1 - a); for the
    preference (w, 1 - w) the best weighted score is 1 - 2 w (1 - w), reached at c = (w, 1 - w)."""
    c = np.atleast_2d(c)
    return np.stack([1 - ((c - e) ** 2).sum(1) for e in np.eye(2)], axis=1)


def exact_front(points: int = 2001) -> np.ndarray:
    a = np.linspace(0, 1, points)
    return unit_quadratics(np.column_stack([a, 1 - a]))


REF = np.array([-1.0, -1.0])  # each metric's worst value over the box is -1


def objective():
    return mm.FunctionObjective(unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)


def hv(points):
    return mm.hypervolume(np.asarray(points), REF)


def test_default_is_adaptive_and_spends_exactly_its_budget():
    obj = objective()
    result = mm.MAP(budget=14, seed=0).fit(obj, 2)
    assert obj.num_evaluations == 14 and result.num_evaluations == 14
    # the metrics are exact quadratics, so cross-validation must pick the quadratic-plus-GP model
    assert result.settings["sampling"] == "adaptive" and result.settings["model"] == "quadratic+gp"
    # 6 to start, then one proposal per round, and last, in one round, the model's pick for each metric alone
    # (the front's ends; no preferences given): the hand-derived optimum of f_i alone is c = e_i, where f_i = 1
    assert result.settings["initial"] == 6 and result.settings["final"] == 2 and result.samples.round.max() == 7
    assert (result.samples.round == 7).sum() == 2
    np.testing.assert_allclose(result.samples.coeffs[-2:], np.eye(2), atol=0.05)
    # a black box (no task vectors) starts from Sobol points alone
    assert result.settings["design"] == "qmc" and not (np.abs(result.samples.coeffs[:6] - np.eye(2)[:, None]).max(axis=2) < 1e-9).any()
    np.testing.assert_allclose(result.samples.metrics, unit_quadratics(result.samples.coeffs))
    assert len(result.settings["proposal_seconds"]) == 8
    assert len(np.unique(result.samples.coeffs.round(6), axis=0)) == 14  # no point evaluated twice


def test_a_merge_starts_from_its_experts(tiny_models):
    """On task vectors, the one-hot coefficient vectors are the fine-tuned models themselves:
    evaluated first after the average merge (1/2, 1/2), which is the weight average of the two
    experts; their metrics are the experts' own, and the average's are the averaged model's."""
    import copy

    import torch

    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts[:2])
    probe = torch.tensor([0, 1, 2, 3, 4])
    tasks = {"sum": lambda m: float(m(probe).sum()), "sq": lambda m: float((m(probe) ** 2).mean())}
    obj = mm.ModelObjective(base, tv, tasks, progress=False)
    result = mm.MAP(budget=8, seed=0).fit(obj, 2)
    assert result.settings["design"] == "sobol" and result.num_evaluations == 8
    np.testing.assert_allclose(result.samples.coeffs[:3], [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    average = copy.deepcopy(fts[0])
    first, second = fts[0].state_dict(), fts[1].state_dict()
    average.load_state_dict({k: (v + second[k]) / 2 if v.is_floating_point() else v for k, v in first.items()})
    for i, expert in enumerate([average, *fts[:2]]):
        expert.eval()
        with torch.no_grad():
            own = [float(expert(probe).sum()), float((expert(probe) ** 2).mean())]
        np.testing.assert_allclose(result.samples.metrics[i], own, rtol=1e-5)


@pytest.mark.parametrize(
    ("initial", "budget", "include", "start"),
    [
        (None, 8, None, [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]),  # the default: the last Sobol point gives way
        (3, 4, None, [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]),
        (2, 3, None, [[1.0, 0.0], [0.0, 1.0]]),  # no room beside the experts: they stay, as before the average
        (None, 2, None, [[1.0, 0.0], [0.0, 1.0]]),  # the budget below the default initial design
        (2, 4, [[0.3, 0.7]], [[0.3, 0.7], [1.0, 0.0], [0.0, 1.0]]),  # initial = 1 + 2: the user's point and the experts
        (None, 8, [[0.5, 0.5]], [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]),  # the user's point is the average: no copy
    ],
    ids=["default", "initial 3", "initial 2", "budget 2", "include, initial 2", "include the average"],
)
def test_the_average_merge_never_displaces_the_experts_or_the_users_points(initial, budget, include, start):
    """At T = 2 the starting design is the user's points, the average merge (1/2, 1/2), the experts
    (the one-hot vectors) and Sobol points; when it is too small for all of them the average, not
    an expert or a user's point, is left out, and it is never evaluated twice."""
    obj = mm.FunctionObjective(unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mm.MAP(budget=budget, initial=initial, seed=0, design="sobol").fit(obj, 2, include=include)
    coeffs = result.samples.coeffs
    np.testing.assert_allclose(coeffs[: len(start)], start)
    assert result.num_evaluations == budget
    assert not (np.abs(coeffs[:, None] - coeffs[None]).max(axis=2) + np.eye(len(coeffs)) < 1e-6).any()  # no point twice
    if initial is None and include is None:  # the default design is the Sobol design with its last row given way
        from map_merge.designs import sobol_design

        np.testing.assert_allclose(coeffs[3 : result.settings["initial"]], sobol_design(2, result.settings["initial"], seed=0)[2:-1])


def test_the_average_merge_is_clipped_to_the_box_and_its_design_keeps_its_size():
    """with_average on hand-made designs: 1/T clipped to the bounds, the user's rows first, the
    last non-expert row giving way, the design's size unchanged."""
    from map_merge.adaptive import with_average

    design = np.array([[1.0, 0.6], [0.6, 1.0], [0.8, 0.9], [0.7, 0.65]])
    np.testing.assert_allclose(with_average(design, 0, (0.6, 1.0)), [[0.6, 0.6], [1.0, 0.6], [0.6, 1.0], [0.8, 0.9]])
    users = np.array([[0.9, 0.9], [1.0, 0.6], [0.6, 1.0], [0.8, 0.9]])
    np.testing.assert_allclose(with_average(users, 1, (0.6, 1.0)), [[0.9, 0.9], [0.6, 0.6], [1.0, 0.6], [0.6, 1.0]])
    np.testing.assert_array_equal(with_average(users[:3], 1, (0.6, 1.0)), users[:3])  # the experts fill the rest
    np.testing.assert_array_equal(with_average(users, 4, (0.6, 1.0)), users)  # the user's points fill it
    sobol = np.array([[0.2, 0.7], [0.9, 0.1], [0.4, 0.4]])  # a black box's design, no experts
    np.testing.assert_allclose(with_average(sobol, 0, (0.0, 1.0)), [[0.5, 0.5], [0.2, 0.7], [0.9, 0.1]])


def test_adaptive_front_against_the_analytic_front_and_random_search():
    ratios, random_ratios = [], []
    for seed in range(3):  # unit_quadratics is merge-like (task i peaks at e_i): start from the experts as on task vectors
        result = mm.MAP(budget=14, seed=seed, design="sobol").fit(objective(), 2)
        ratios.append(hv(result.samples.metrics) / hv(exact_front()))
        random = random_search(objective(), 2, 14, seed=seed)
        random_ratios.append(hv(random.metrics) / hv(exact_front()))
    assert min(ratios) > 0.93  # its own 14 real evaluations nearly cover the exact front
    assert np.mean(ratios) > np.mean(random_ratios) + 0.02


def test_picks_land_on_the_analytic_optimum():
    result = mm.MAP(budget=14, seed=0, design="sobol").fit(objective(), 2)
    for w in (0.0, 0.2, 0.5, 0.9):
        pick = result.select([w, 1 - w])
        score = unit_quadratics(pick)[0] @ [w, 1 - w]
        assert score == pytest.approx(1 - 2 * w * (1 - w), abs=0.01)  # hand-derived optimum


def test_the_last_evaluations_go_to_the_picks_for_the_users_preferences():
    prefs = np.array([[0.3, 0.7], [0.8, 0.2]])
    result = mm.MAP(budget=14, preferences=prefs, seed=1, design="sobol").fit(objective(), 2)
    assert result.settings["final"] == 2 and result.num_evaluations == 14
    last = result.samples.coeffs[-2:]
    np.testing.assert_allclose(last, [[0.3, 0.7], [0.8, 0.2]], atol=0.08)  # the optimum for (w, 1 - w) is c = (w, 1 - w)


def test_picks_that_repeat_an_evaluation_give_way_to_proposals_in_the_same_round():
    """The ends' picks of f_i = 1 - |c - e_i|^2 are the experts e_i, evaluated in the start: both give way. With
    rounds of 3 points, their two proposals go together into the picks' round (one call of 2, not two of 1); one
    point at a time (batch=1) keeps proposing them one by one, each after the last one's evaluation."""
    for batch, tail in ((3, [2]), (1, [1, 1])):
        sizes = []

        def counted(c):
            sizes.append(len(np.atleast_2d(c)))
            return unit_quadratics(c)

        result = mm.MAP(budget=14, batch=batch, seed=0, design="sobol").fit(mm.FunctionObjective(counted, 2, ["a", "b"], links=["identity"] * 2), 2)
        assert result.settings["final"] == 2 and result.settings["final_evaluated"] == 0, batch  # both picks were repeats
        assert result.num_evaluations == sum(sizes) == 14 and len(np.unique(result.samples.coeffs.round(9), axis=0)) == 14
        assert sizes[-len(tail):] == tail and result.samples.round.max() == len(sizes) - 1, (batch, sizes)


def test_picks_and_proposals_after_them_fill_rounds_without_repeats_or_overrun(two_threads):
    """Four picks (two ends, two of them repeats of the experts) in rounds of 2: each round holds at most 2 new points
    (the give-way round and the proposals after it), the budget holds and no point is evaluated twice; with two
    asynchronous workers the last evaluations go two at a time as well."""
    sizes = []

    def counted(c):
        sizes.append(len(np.atleast_2d(c)))
        return unit_quadratics(c)

    result = mm.MAP(budget=15, batch=2, final=4, seed=0, design="sobol").fit(mm.FunctionObjective(counted, 2, ["a", "b"], links=["identity"] * 2), 2)
    assert result.num_evaluations == sum(sizes) == 15 and len(np.unique(result.samples.coeffs.round(9), axis=0)) == 15
    # 11 evaluations before the picks (6, then rounds of 2); the picks round holds the k new picks and, up to 2, proposals
    # for the repeats; the rest in rounds of 2
    k = result.settings["final_evaluated"]
    picks_round = k + max(0, min(4 - k, 2 - k))
    rest = 15 - 11 - picks_round
    assert result.settings["final"] == 4 and sum(sizes[:-1 - (rest + 1) // 2]) == 11
    assert sizes[-1 - (rest + 1) // 2:] == [picks_round] + [2] * (rest // 2) + [1] * (rest % 2), (k, sizes)
    evaluated = []

    def slow(c):
        time.sleep(0.02)
        evaluated.append(np.atleast_2d(c).copy())
        return unit_quadratics(c)[0]

    obj = mm.FunctionObjective(slow, 2, ["a", "b"], batched=False, executor=two_threads)
    result = mm.MAP(budget=12, seed=0, design="sobol").fit(obj, 2)
    assert result.num_evaluations == 12 == len(evaluated) and len(np.unique(result.samples.coeffs.round(9), axis=0)) == 12
    assert result.settings["asynchronous"] and result.settings["final_evaluated"] == 0  # both ends' picks were the experts
    tail = result.samples.round[-2:]
    assert tail[0] == tail[1] and (result.samples.round == tail[0]).sum() == 2  # their two proposals: one round, together


def test_asynchronous_workers_stay_busy_and_the_budget_holds(two_threads):
    def slow(c):
        time.sleep(0.02)
        return unit_quadratics(c)[0]

    obj = mm.FunctionObjective(slow, 2, ["a", "b"], batched=False, executor=two_threads)
    result = mm.MAP(budget=12, seed=0).fit(obj, 2)
    assert result.settings["asynchronous"] is True and result.settings["max_in_flight"] == 2
    assert result.num_evaluations == 12 and obj.num_evaluations == 12
    np.testing.assert_allclose(result.samples.metrics, unit_quadratics(result.samples.coeffs))


def test_adaptive_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 metrics"):
        mm.MAP(budget=8).fit(mm.FunctionObjective(lambda c: unit_quadratics(c)[:, :1], 2, ["a"]), 2)
    with pytest.raises(ValueError, match="preferences have 3 entries but the objective returns 2"):
        mm.MAP(budget=8, preferences=[1, 1, 1]).fit(objective(), 2)
    with pytest.raises(ValueError, match="sampling must be one of"):
        mm.MAP(sampling="grid")
    with pytest.raises(ValueError, match="budget must be at least 1"):
        mm.MAP(budget=0)
    with pytest.raises(ValueError, match="non-negative rows"):
        mm.MAP(preferences=[[1, -1]])
    with pytest.raises(ValueError, match="give model or its older name final_model"):
        mm.MAP(model="gp", final_model="gp")


def test_gp_model_interpolates_and_its_torch_mean_matches():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(25, 2))
    model = GPModel(x, unit_quadratics(x), (0.0, 1.0))
    test = rng.uniform(size=(200, 2))
    mean, std = model.predict(test, return_std=True)
    assert np.abs(mean - unit_quadratics(test)).max() < 0.02  # a smooth function, 25 points
    assert std.shape == (200, 2) and (std >= 0).all()
    import torch

    np.testing.assert_allclose(model.torch_predict(torch.tensor(test)).detach().numpy(), mean, atol=1e-8)
    warm = GPModel(x, unit_quadratics(x), (0.0, 1.0), warm_start=model)
    np.testing.assert_allclose(warm.predict(test), mean, atol=1e-3)  # same data: the warm start lands on the same fit
    with pytest.raises(ValueError, match="at least 2 evaluations"):
        GPModel(x[:1], unit_quadratics(x[:1]), (0.0, 1.0))


@pytest.mark.parametrize("noisy", [False, True], ids=["observed front", "posterior front"])
def test_expected_improvement_goes_to_the_gap_and_avoids_pending_points(noisy):
    """The evaluated front of f(c) = (c, 1 - c) on [0, 1] (T = 1) has a gap between 0.2 and 0.8:
    the largest hypervolume gain is inside it; a point pending there pushes the next one elsewhere.
    The same with the front taken from the model's posterior at the evaluated points (qLogNEHVI)."""
    x = np.array([[0.0], [0.1], [0.2], [0.8], [0.9], [1.0]])
    extra = {"baseline": x} if noisy else {}

    def line(c):
        c = np.atleast_2d(c)
        return np.column_stack([c[:, 0], 1 - c[:, 0]])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPModel(x, line(x), (0.0, 1.0))
        first = propose_ehvi(model, line(x), ("max", "max"), (0.0, 1.0), seed=0, **extra)
        assert first.shape == (1, 1) and 0.3 < first[0, 0] < 0.7
        second = propose_ehvi(model, line(x), ("max", "max"), (0.0, 1.0), pending=first, seed=0, **extra)
    assert abs(second[0, 0] - first[0, 0]) > 0.08 and 0.2 < second[0, 0] < 0.8


def test_a_lucky_evaluation_does_not_set_the_bar_with_two_metrics(monkeypatch):
    """f(c) = (c, 1 - c) on [0, 1], evaluated on a lattice of step 0.1, with one lucky evaluation at
    c = 0.5 scoring (0.65, 0.65) instead of (0.5, 0.5). Taken at face value it dominates the whole
    stretch 0.35 < c < 0.65 of the true front, so improving the *observed* front pays only beyond
    it; the model smooths the outlier out (a fitted noise level), and improving the front of its
    posterior at the evaluated points (qLogNEHVI, what MAP's adaptive sampling does with two
    metrics) goes back into that stretch, where the true front is. Seeded: the same proposal twice,
    and the caller's torch random state untouched. With three metrics, or no evaluated points given,
    the observed front (qLogEHVI)."""
    import torch
    from botorch.acquisition.multi_objective import logei

    x = np.linspace(0.0, 1.0, 11)[:, None]
    y = np.column_stack([x[:, 0], 1 - x[:, 0]])
    y[5] = [0.65, 0.65]
    built: list = []

    class Spy(logei.qLogNoisyExpectedHypervolumeImprovement):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["X_baseline"].shape)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(logei, "qLogNoisyExpectedHypervolumeImprovement", Spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPModel(x, y, (0.0, 1.0))
        torch.manual_seed(123)
        before = torch.rand(1)
        torch.manual_seed(123)
        observed = propose_ehvi(model, y, ("max", "max"), (0.0, 1.0), seed=0)
        posterior = propose_ehvi(model, y, ("max", "max"), (0.0, 1.0), seed=0, baseline=x)
        again = propose_ehvi(model, y, ("max", "max"), (0.0, 1.0), seed=0, baseline=x)
        after = torch.rand(1)
    assert built == [torch.Size([11, 1])] * 2
    assert not 0.35 < observed[0, 0] < 0.65
    assert 0.35 < posterior[0, 0] < 0.65
    np.testing.assert_array_equal(posterior, again)
    assert after.item() == before.item()
    with pytest.raises(ValueError, match="baseline has shape"):
        propose_ehvi(model, y, ("max", "max"), (0.0, 1.0), seed=0, baseline=x[:5])


def test_a_failing_acquisition_optimiser_falls_back_to_the_best_quasi_random_point(monkeypatch, caplog):
    """botorch's optimiser can fail on NaN gradients; the run goes on with the best of the Sobol
    points under the same acquisition, which still lands in the front's gap (0.2, 0.8)."""
    import botorch.optim
    import torch
    from botorch.exceptions.errors import OptimizationGradientError

    from map_merge.acquisition import best_of

    x = np.array([[0.0], [0.1], [0.2], [0.8], [0.9], [1.0]])

    def line(c):
        c = np.atleast_2d(c)
        return np.column_stack([c[:, 0], 1 - c[:, 0]])

    def fails(*args, **kwargs):
        raise OptimizationGradientError("2 elements of the gradient array are NaN", current_x=np.zeros(1))

    monkeypatch.setattr(botorch.optim, "optimize_acqf", fails)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPModel(x, line(x), (0.0, 1.0))
        with caplog.at_level("WARNING", logger="map_merge.acquisition"):
            point = propose_ehvi(model, line(x), ("max", "max"), (0.0, 1.0), seed=0)
    assert point.shape == (1, 1) and 0.3 < point[0, 0] < 0.7
    assert "acquisition optimiser failed" in caplog.text
    # best_of: the rows with the largest values of a hand-made acquisition, -(x - 0.3)^2 (one point per row)
    candidates = torch.tensor([[0.0], [0.25], [0.5], [0.32], [1.0]], dtype=torch.float64)
    chosen = best_of(lambda X: -((X[:, 0, 0] - 0.3) ** 2), candidates, 2)
    assert chosen[:, 0].tolist() == [0.32, 0.25]


def _spy_on_ehvi_reference(monkeypatch) -> list:
    """The ``ref_point`` of every qLogEHVI built from now on, appended to the returned list."""
    from botorch.acquisition.multi_objective import logei

    seen: list = []

    class Spy(logei.qLogExpectedHypervolumeImprovement):
        def __init__(self, *args, **kwargs):
            seen.append(list(kwargs["ref_point"]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(logei, "qLogExpectedHypervolumeImprovement", Spy)
    return seen


def test_proposals_count_hypervolume_from_the_nadir_of_the_evaluated_front(monkeypatch):
    """Oriented front (1, 3), (2, 2), (3, 1) with dominated (0, 0) and (0.5, 0.5): the reference is
    the front's nadir (1, 1) less 10% of its range (2, 2), i.e. (0.8, 0.8), whatever the dominated
    points; the first metric is minimised (raw values negated), the second maximised."""
    from map_merge.acquisition import front_reference_point

    oriented = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [0.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(front_reference_point(oriented), [0.8, 0.8])
    np.testing.assert_allclose(front_reference_point(oriented[:3]), [0.8, 0.8])
    seen = _spy_on_ehvi_reference(monkeypatch)
    x = np.array([[0.1], [0.3], [0.5], [0.7], [0.9]])
    raw = oriented * np.array([-1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPModel(x, raw, (0.0, 1.0))
        propose_ehvi(model, raw, ("min", "max"), (0.0, 1.0), seed=0)
    np.testing.assert_allclose(seen, [[0.8, 0.8]])


def test_the_front_reference_point_stays_off_a_front_with_copies_or_a_tied_metric():
    """Copies of a front point are one point (as Ax: botorch's is_non_dominated deduplicates): the
    front {(0.7, 0.6)} is a one-point front, moved out by 10% of |value| to (0.63, 0.54), not onto
    the point. Three metrics with the front tied at 0.6 in the third: that metric moves out by 10%
    of 0.6 to 0.54 (the others by 10% of their range 0.4: 0.5 - 0.04 = 0.46), so a proposal giving
    up some of it can still add hypervolume."""
    from map_merge.acquisition import front_reference_point

    copies = np.array([[0.7, 0.6], [0.7, 0.6], [0.2, 0.1]])
    np.testing.assert_allclose(front_reference_point(copies), [0.63, 0.54])
    np.testing.assert_allclose(front_reference_point(copies[1:]), [0.63, 0.54])
    tied = np.array([[0.9, 0.5, 0.6], [0.5, 0.9, 0.6], [0.3, 0.3, 0.2]])
    np.testing.assert_allclose(front_reference_point(tied), [0.46, 0.46, 0.54])


def test_the_front_reference_point_stays_off_a_one_point_front_at_zero():
    """A one-point front {(0, 0.5)} (a zero error, oriented -0, that dominates (-0.4, 0.2)): 10% of
    |0| would put the reference 1e-8 under the front, where a trade-off giving up any of the first
    metric adds no hypervolume; there it moves out by 10% of the evaluations' range 0.4, to -0.04
    (the second metric by 10% of 0.5, to 0.45)."""
    from map_merge.acquisition import ehvi_reference_point, front_reference_point

    oriented = np.array([[0.0, 0.5], [-0.4, 0.2]])
    np.testing.assert_allclose(front_reference_point(oriented), [-0.04, 0.45])
    np.testing.assert_allclose(ehvi_reference_point(oriented), [-0.04, 0.45])


def test_bayesian_map_keeps_the_reference_beyond_its_worst_evaluation(monkeypatch):
    """Bayesian MAP's EHVI proposals use the reference it was measured with: the worst evaluation
    less 10% of the evaluations' range (hand-computed here from the metrics each call saw), not
    the front's nadir of MAP's default."""
    import map_merge.bayes as bayes
    from map_merge import BayesianMAP

    calls = []
    real = bayes.propose_ehvi

    def spy(model, metrics, senses, bounds, **kwargs):
        calls.append((np.array(metrics), kwargs.get("ref_point")))
        return real(model, metrics, senses, bounds, **kwargs)

    monkeypatch.setattr(bayes, "propose_ehvi", spy)

    def objective(c):
        c = np.atleast_2d(c)
        return np.column_stack([1 - (c[:, 0] - 0.8) ** 2 - 0.3 * c[:, 1] ** 2, 1 - (c[:, 1] - 0.8) ** 2 - 0.3 * c[:, 0] ** 2])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BayesianMAP(budget=8, initial=6, batch=1, seed=0).fit(objective, 2)
    assert calls
    for metrics, ref in calls:
        low, high = metrics.min(axis=0), metrics.max(axis=0)
        np.testing.assert_allclose(ref, low - 0.1 * (high - low + 1e-9))


def test_with_three_metrics_proposals_count_hypervolume_from_beyond_the_worst_evaluation(monkeypatch):
    """M = 3: oriented front (1, 3, 2), (3, 1, 2), (2, 2, 3) and dominated (0, 0, 1): the reference
    is the worst value per metric less 10% of the evaluations' range, (-0.3, -0.3, 0.8), not the
    front's nadir (0.8, 0.8, 1.9); at M = 2 the front's nadir (checked above)."""
    from map_merge.acquisition import ehvi_reference_point

    oriented = np.array([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [2.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(ehvi_reference_point(oriented), [-0.3, -0.3, 0.8], atol=1e-8)
    np.testing.assert_allclose(ehvi_reference_point(oriented[:, :2]), [0.8, 0.8])
    seen = _spy_on_ehvi_reference(monkeypatch)
    x = np.array([[0.1, 0.2], [0.3, 0.9], [0.5, 0.4], [0.9, 0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPModel(x, oriented, (0.0, 1.0))
        propose_ehvi(model, oriented, ("max", "max", "max"), (0.0, 1.0), seed=0)
    np.testing.assert_allclose(seen, [[-0.3, -0.3, 0.8]], atol=1e-8)


def test_final_preferences_are_the_ends_first_and_always_as_many_as_asked():
    """Without preferences: the one-hot ends, then the equal preference, then spread points; exactly
    ``final`` rows, all different, on the simplex, for any number of metrics (a 5-metric grid of about 8
    points is only its corners: the spread must still be found)."""
    from map_merge.adaptive import _final_preferences

    for metrics in range(2, 9):
        for final in (0, 1, metrics, metrics + 1, metrics + 2, 2 * metrics + 3, 40):
            rows = _final_preferences(None, metrics, final)
            assert rows.shape == (final, metrics), (metrics, final)
            assert len(np.unique(rows.round(9), axis=0)) == final
            np.testing.assert_allclose(rows.sum(axis=1), 1.0)
            np.testing.assert_array_equal(rows[: min(final, metrics)], np.eye(metrics)[: min(final, metrics)])
            if final > metrics:
                np.testing.assert_allclose(rows[metrics], np.full(metrics, 1.0 / metrics))


def test_the_ends_wait_for_a_budget_with_as_many_proposals():
    """The default's picks for the ends only where the budget leaves at least as many proposals before them:
    budget 10 at T = 2 (6 to start, 4 left) spends 2 on the ends, budget 9 (3 left) none; a plain callable
    with 3 metrics and 2 coefficients (no names: counted one per coefficient) evaluates 2 ends."""
    for budget, final in ((10, 2), (9, 0)):
        result = mm.MAP(budget=budget, seed=0).fit(objective(), 2)
        assert result.settings["final"] == final and result.num_evaluations == budget
    three = lambda c: np.column_stack([unit_quadratics(c), unit_quadratics(c)[:, :1]])  # noqa: E731
    result = mm.MAP(budget=12, seed=0).fit(three, 2)
    assert result.num_evaluations == 12 and result.settings["final"] == 2
