"""Edge cases of MAP's adaptive default found in review: small budgets, model choice, determinism."""

import warnings

import numpy as np

import map_merge as mm
from map_merge.designs import qmc_design
from map_merge.result import Samples


def two_bowls(c):
    """f_i(c) = 1 - |c - e_i|^2 on T = 2 coefficients (both maximised)."""
    c = np.atleast_2d(c)
    return np.stack([1 - ((c - e) ** 2).sum(1) for e in np.eye(2)], axis=1)


def test_auto_model_with_fewer_evaluations_than_cross_validation_needs_uses_the_gp():
    # 9 evaluations at T = 2: enough for a fold's quadratic (9 * 4 >= 7 * 5) but under the 10 that
    # 5-fold cross-validation needs; the model choice used to raise after the whole budget was spent
    coeffs = qmc_design(2, 9, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mm.MAP(budget=9).fit_samples(Samples(coeffs, two_bowls(coeffs)))
    assert result.settings["model"] == "gp"
    pick = result.select([1.0, 1.0])
    assert np.all(np.isfinite(pick))


class _Constant:
    def __init__(self, value):
        self.value = value

    def predict(self, coeffs):
        return np.full((len(coeffs), 2), self.value)


def test_cross_validation_scores_a_model_predicting_nan_as_inf_so_it_never_wins():
    from map_merge.model_choice import cross_validated_errors

    coeffs = qmc_design(2, 10, seed=0)
    metrics = two_bowls(coeffs)
    errors = cross_validated_errors(coeffs, metrics, {"nan": lambda c, m: _Constant(np.nan),
                                                      "mean": lambda c, m: _Constant(float(metrics.mean()))})
    assert errors["nan"] == float("inf") and np.isfinite(errors["mean"])
    assert min(errors, key=lambda name: (errors[name], name)) == "mean"


def test_preferences_of_the_wrong_length_are_refused_before_any_evaluation():
    import pytest

    calls = []

    def counted(c):
        calls.append(len(np.atleast_2d(c)))
        return two_bowls(c)

    objective = mm.FunctionObjective(counted, 2, ["a", "b"])
    with pytest.raises(ValueError, match="preferences have 3 entries but the objective returns 2"):
        mm.MAP(budget=8, preferences=[1, 1, 1]).fit(objective, 2)
    assert calls == []


def test_infinite_preferences_are_refused_when_map_is_made():
    import pytest

    # [inf, 1] normalised is [nan, 0]: it used to pass the constructor and fail after the evaluations
    with pytest.raises(ValueError, match="finite non-negative rows"):
        mm.MAP(budget=8, preferences=[[np.inf, 1.0]])


def test_task_names_of_the_wrong_length_stop_the_run_after_the_starting_design():
    import pytest

    calls = []

    def counted(c):
        calls.append(len(np.atleast_2d(c)))
        return two_bowls(c)

    with pytest.raises(ValueError, match="got 3 task names for 2 metrics"):
        mm.MAP(budget=12, initial=6).fit(counted, 2, task_names=["a", "b", "c"])
    assert sum(calls) == 6  # the starting design only, not the whole budget of 12


def test_an_explicit_quadratic_model_with_too_small_a_budget_is_refused_before_any_evaluation():
    import pytest

    calls = []

    def counted(c):
        calls.append(len(np.atleast_2d(c)))
        return two_bowls(c)

    for model in ("quadratic", "quadratic+gp"):  # a quadratic in T = 2 has (3 * 4) / 2 = 6 parameters
        with pytest.raises(ValueError, match="6 parameters: budget=5 is too few"):
            mm.MAP(budget=5, model=model, link="identity").fit(counted, 2)
    assert calls == []
