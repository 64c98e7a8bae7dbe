"""MAP(proposal_model="auto"): proposals under the model cross-validation prefers, against
analytic ground truths (an exact quadratic, where the quadratic + GP model must win)."""

import numpy as np
import pytest

import map_merge as mm
from map_merge.adaptive import PROPOSAL_RECHOOSE, _chosen_proposal_model
from map_merge.residual_gp import ResidualGPModel


def unit_quadratics(c):
    """f_i(c) = 1 - |c - e_i|^2 (T = 2): for the preference (w, 1 - w) the best weighted score
    is 1 - 2 w (1 - w), reached at c = (w, 1 - w)."""
    c = np.atleast_2d(c)
    return np.stack([1 - ((c - e) ** 2).sum(1) for e in np.eye(2)], axis=1)


def test_proposal_model_is_validated():
    with pytest.raises(ValueError, match="proposal_model must be None or one of"):
        mm.MAP(proposal_model="quadratic")


def test_exact_quadratics_are_proposed_under_the_quadratic_model_and_rechosen_on_schedule():
    est = mm.MAP(budget=20, seed=0, proposal_model="auto")
    obj = mm.FunctionObjective(unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    x = np.random.default_rng(0).uniform(size=(12, 2))
    y = unit_quadratics(x)
    kind, errors = est.cross_validated_kind(mm.Samples(x, y, np.zeros(12, dtype=int)), obj, ("a", "b"))
    assert kind == "quadratic+gp" and errors["quadratic+gp"] < 1e-6 < errors["gp"]  # exact: the quadratic's held-out error ~ 0
    state: dict = {}
    model = _chosen_proposal_model(est, obj, x, y, state)
    assert isinstance(model, ResidualGPModel)
    grid = np.random.default_rng(1).uniform(size=(50, 2))
    np.testing.assert_allclose(model.predict(grid), unit_quadratics(grid), atol=1e-3)
    # chosen again only after PROPOSAL_RECHOOSE more evaluations
    for extra in range(1, PROPOSAL_RECHOOSE + 1):
        x2 = np.concatenate([x, np.random.default_rng(extra).uniform(size=(extra, 2))])
        _chosen_proposal_model(est, obj, x2, unit_quadratics(x2), state)
    assert [n for n, _ in state["proposal_kinds"]] == [12, 12 + PROPOSAL_RECHOOSE]


def test_too_few_evaluations_propose_under_the_gps():
    est = mm.MAP(budget=20, proposal_model="auto")
    x = np.random.default_rng(0).uniform(size=(8, 2))  # under 2 per fold: no cross-validation
    assert _chosen_proposal_model(est, None, x, unit_quadratics(x), {}) is None


def test_auto_fit_spends_its_budget_and_finds_the_exact_front():
    obj = mm.FunctionObjective(unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    result = mm.MAP(budget=16, seed=0, proposal_model="auto").fit(obj, 2)
    assert obj.num_evaluations == 16 and result.settings["proposal_model"] == "auto"
    kinds = result.settings["proposal_kinds"]
    assert kinds and kinds[-1][1] == "quadratic+gp"  # exact quadratics: cross-validation must prefer the quadratic
    for w in (0.2, 0.5, 0.8):
        pick = result.select([w, 1 - w])
        best = 1 - 2 * w * (1 - w)  # closed form
        assert float((unit_quadratics(pick) @ [w, 1 - w])[0]) == pytest.approx(best, abs=2e-3)


def test_auto_proposals_with_pending_points_and_batches_spend_the_budget(monkeypatch, two_threads):
    """The quadratic + GP model proposes with points in flight (fantasised through its MC objective)
    and in synchronous batches; the choices are saved as JSON."""
    import json

    import map_merge.acquisition as acquisition

    seen = []
    original = acquisition.propose_ehvi

    def spy(model, *args, **kwargs):
        seen.append((type(model).__name__, kwargs.get("pending") is not None and len(kwargs["pending"]) > 0, kwargs.get("q", 1)))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(acquisition, "propose_ehvi", spy)

    obj = mm.FunctionObjective(lambda c: unit_quadratics(c)[0], 2, ["a", "b"], batched=False, executor=two_threads, links=["identity"] * 2)
    result = mm.MAP(budget=15, seed=0, proposal_model="auto").fit(obj, 2)
    assert result.settings["asynchronous"] is True and result.num_evaluations == 15 == obj.num_evaluations
    assert ("ResidualGPModel", True, 1) in seen  # a proposal under the quadratic + GP model with a point in flight
    json.dumps(result.to_dict())

    seen.clear()
    obj = mm.FunctionObjective(unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    result = mm.MAP(budget=18, batch=3, seed=0, proposal_model="auto").fit(obj, 2)
    assert result.num_evaluations == 18 and ("ResidualGPModel", False, 3) in seen


def test_the_default_proposal_model_is_the_gps_below_four_tasks_and_auto_from_four():
    """``proposal_model=None`` (the default) resolves per number of coefficients; a choice given is kept."""
    from map_merge.adaptive import AUTO_PROPOSALS_FROM, proposal_model_for

    assert AUTO_PROPOSALS_FROM == 4
    assert [proposal_model_for(None, t) for t in (2, 3, 4, 6)] == ["gp", "gp", "auto", "auto"]
    assert proposal_model_for("gp", 5) == "gp" and proposal_model_for("auto", 2) == "auto"
    obj = mm.FunctionObjective(unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    result = mm.MAP(budget=12, seed=0).fit(obj, 2)  # "auto" would choose by cross-validation from P + 2 = 8 evaluations on
    assert result.settings["proposal_model"] == "gp" and result.settings["proposal_kinds"] == []


def test_the_default_at_four_tasks_proposes_under_the_cross_validated_model():
    """T = 4 (P = 15 quadratic parameters): from P + 2 = 17 evaluations on the default makes a cross-validated
    choice (the GPs under ``proposal_model="gp"`` make none); at 17 a 5-fold training set holds 13-14 < P + 1
    points, too few for the quadratic, so the choice is the GPs. The budget is spent exactly."""
    def quadratics4(c):
        c = np.atleast_2d(c)
        return np.stack([1 - ((c - e) ** 2).sum(1) for e in np.eye(4)], axis=1)

    obj = mm.FunctionObjective(quadratics4, 4, list("abcd"), links=["identity"] * 4)
    result = mm.MAP(budget=18, seed=0).fit(obj, 4)
    assert obj.num_evaluations == 18 and result.settings["proposal_model"] == "auto"
    assert result.settings["proposal_kinds"] == [(17, "gp")]
    assert result.settings["final"] == 0  # no picks for the front's ends under cross-validated proposals: proposals to the end
