"""Review of the quadratic + GP model's reference (commit 44e80c5): a reference of other metrics
is refused instead of broadcast into the std, and a result's model can warm-start a refit."""

import numpy as np
import pytest

import map_merge as mm
from map_merge.gp_model import GPModel
from map_merge.residual_gp import ResidualGPModel
from map_merge.result import Samples
from map_merge.surrogate import QuadraticSurrogate


def _data():
    rng = np.random.default_rng(1)
    coeffs = rng.uniform(0, 1, (10, 2))
    metrics = np.stack([0.2 + 0.3 * coeffs[:, 0] + 0.3 * np.sin(2 * coeffs[:, 1]), 0.1 + 0.8 * coeffs[:, 0] * coeffs[:, 1]], 1)
    quadratics = [QuadraticSurrogate(link="identity", r2_warn=-np.inf).fit(coeffs, metrics[:, j]) for j in range(2)]
    return coeffs, metrics, quadratics


@pytest.mark.filterwarnings("ignore")
def test_a_reference_of_another_number_of_metrics_is_refused_not_broadcast():
    coeffs, metrics, quadratics = _data()
    one_metric = GPModel(coeffs, metrics[:, :1], (0.0, 1.0))  # (K, 1) would broadcast over (K, 2)
    with pytest.raises(ValueError, match="reference model"):
        ResidualGPModel(quadratics, coeffs, metrics, (0.0, 1.0), reference=one_metric)


class _OneColumn:
    """A reference without ``num_metrics`` that predicts one column for a two-metric model."""

    def predict(self, coeffs, return_std=False):
        return np.zeros((len(np.atleast_2d(coeffs)), 1))


@pytest.mark.filterwarnings("ignore")
def test_a_reference_predicting_the_wrong_shape_fails_at_predict():
    coeffs, metrics, quadratics = _data()
    model = ResidualGPModel(quadratics, coeffs, metrics, (0.0, 1.0), reference=_OneColumn())
    assert model.predict(coeffs[:3]).shape == (3, 2)  # the mean alone never asks the reference
    with pytest.raises(ValueError, match="reference model predicts shape"):
        model.predict(coeffs[:3], return_std=True)


@pytest.mark.filterwarnings("ignore")
def test_a_quadratic_gp_results_model_warm_starts_a_gp_refit():
    coeffs, metrics, _ = _data()
    first = mm.MAP(model="quadratic+gp", max_front_points=5).fit_samples(Samples(coeffs, metrics))
    assert isinstance(first.model, ResidualGPModel)
    # before: GPModel read warm_start.noise of the ResidualGPModel (AttributeError)
    refit = mm.MAP(model="gp", max_front_points=5).fit_samples(Samples(coeffs, metrics), warm_start=first.model)
    assert refit.settings["model"] == "gp" and isinstance(refit.model, GPModel)
    # the hyper-parameters it started from are the reference's: the same fit as warm-starting from it
    direct = GPModel(coeffs, metrics, (0.0, 1.0), warm_start=first.model.reference)
    np.testing.assert_allclose(refit.model.predict(coeffs), direct.predict(coeffs), rtol=1e-6, atol=1e-9)
