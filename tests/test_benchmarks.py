"""Each benchmark script runs on a tiny configuration and writes its JSON and PNG (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, args, outputs",
    [
        ("bench_merge.py", [], ["merge_speed.json", "merge_speed_cpu.png"]),
        ("bench_map_speed.py", [], ["map_speed.json", "map_speed.png", "map_speed_proposals.png"]),
        ("bench_fronts.py", ["--problem", "analytic", "--tasks", "2"],
         ["fronts_analytic_T2.json", "fronts_analytic_T2.png", "fronts_analytic_T2_regret.png", "fronts_analytic_T2_example.png"]),
        ("bench_fronts.py", ["--problem", "lm", "--tasks", "2", "--methods", "MAP,CMA-ES", "--sweeps", "task arithmetic", "--test-preferences", "3"],
         ["fronts_lm_T2.json", "fronts_lm_T2.png", "fronts_lm_T2_regret.png", "fronts_lm_T2_example.png"]),
        ("bench_map_vs_moe.py", ["--zoo", "vision"], ["map_vs_moe_vision.json", "map_vs_moe_vision_pairs.png", "map_vs_moe_vision_3d.png"]),
        ("bench_nested.py", [], ["nested.json"]),
        ("bench_scale.py", ["--no-mergekit"], ["scale.json", "scale_tasks.png", "scale_size.png"]),
        pytest.param("bench_distributed.py", [], ["distributed.json", "distributed.png"], marks=pytest.mark.ray),
        ("bench_map_levers.py", ["--sets", "tune"], ["map_levers.json", "map_levers.png"]),
        ("bench_adaptive_levers.py", ["--variants", "default,log outputs,quadratic+gp picks,qNParEGO"],
         ["adaptive_levers_analytic_T2.json", "adaptive_levers_analytic_T2.png", "adaptive_levers_analytic_T2_regret.png"]),
        ("bench_moe_convergence.py", [], ["moe_convergence.json", "moe_convergence.png"]),
        ("bench_lm_grid.py", ["--no-lm-eval"], ["lm_grid.json", "lm_grid_T2.png", "lm_grid_T3.png", "lm_grid_zoo.png"]),
        ("bench_groups.py", ["--zoo", "lm"], ["groups_lm.json", "groups_lm.png"]),
        ("bench_noisy_pick.py", ["--pairs", "code,legal"], ["noisy_pick.json", "noisy_pick.png"]),
        ("bench_pick_rules.py", [], ["pick_rules_analytic_T2.json", "pick_rules_analytic_T2.png"]),
    ],
)
def test_benchmark_runs_quick(script, args, outputs, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path), *args], check=True, cwd=ROOT)
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 100
    payload = json.loads((tmp_path / outputs[0]).read_text())
    assert payload["rows"] and "machine" in payload
    assert not list(tmp_path.glob("*.runs*.jsonl"))  # a journal of finished runs goes once the JSON holds them
    if script == "bench_noisy_pick.py":  # the zoo's lm-eval objective says its scores are noisy, and the runs knew it
        assert all(r["noisy"] == [True, True] for r in payload["rows"]) and {r["method"] for r in payload["rows"]} == {"MAP", "MAP (design)"}
    if script in ("bench_pick_rules.py", "bench_adaptive_levers.py"):  # which metrics each row's pick scored by the model
        assert all(r["noisy"] == [False, False] for r in payload["rows"])  # the analytic problem flags none
    if script == "bench_pick_rules.py":  # every rule scored on the same run, each a finite regret
        assert [s["rule"] for s in payload["summary"]] == ["caution 1", "caution 0.5", "caution 0.25", "caution 0", "over mean",
                                                           "posterior", "best mean"]
        assert all(np.isfinite(s["pick_regret_mean"]) for s in payload["summary"])
    if script == "bench_fronts.py" and "lm" in args:  # losses are minimised: every score oriented by the senses, test regrets of the picks present
        assert payload["senses"] == ["min", "min"] and len(payload["test_preferences"]) == 3
        regrets = [r["pick_regret"] for r in payload["rows"]]
        assert len(regrets) == 3 and all(np.isfinite(regrets))  # task arithmetic, MAP, CMA-ES (one seed with --quick)
        # against the grid's front: 1 means as large as the grid's; the grid's own best weighted test scores are recorded
        assert all(r["hv_ratio"] >= 0.0 for r in payload["rows"]) and len(payload["grid_best_weighted_test"]) == 3


def test_bench_fronts_update_adds_seeds_to_a_table(tmp_path):
    """``--update --first-seed`` adds seeds: the earlier rows of every (method, seed) not rerun stay."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic"]
    subprocess.run([*base, "--methods", "random search,CMA-ES"], check=True, cwd=ROOT)
    first = json.loads((tmp_path / "fronts_analytic_T2.json").read_text())
    subprocess.run([*base, "--methods", "random search", "--update", "--first-seed", "1"], check=True, cwd=ROOT)
    payload = json.loads((tmp_path / "fronts_analytic_T2.json").read_text())
    pairs = sorted((r["method"], r["seed"]) for r in payload["rows"])
    assert pairs == [("CMA-ES", 0), ("random search", 0), ("random search", 1)]
    kept = next(r for r in payload["rows"] if (r["method"], r["seed"]) == ("random search", 0))
    assert kept == next(r for r in first["rows"] if r["method"] == "random search")
    assert payload["seeds"] == 1  # CMA-ES has one seed: the table says the fewest
    assert next(s for s in payload["summary"] if s["method"] == "random search")["seeds"] == 2


def test_bench_fronts_update_refuses_a_table_scored_otherwise(tmp_path):
    """``--update`` adds rows to a table only when they are scored alike: other test preferences (or re-evaluations, or
    another proposal model) are refused before anything runs, and the table is left as it was."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
            "--methods", "random search"]
    subprocess.run([*base, "--test-preferences", "2"], check=True, cwd=ROOT)
    table = tmp_path / "fronts_analytic_T2.json"
    before = table.read_bytes()
    for other, setting in ((["--test-preferences", "3"], "test_preferences"), (["--test-preferences", "2", "--reevaluations", "3"],
                                                                                "reevaluations"),
                           (["--test-preferences", "2", "--proposal-model", "auto"], "proposal_model")):
        done = subprocess.run([*base, *other, "--update", "--first-seed", "1"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and setting in done.stderr
        assert table.read_bytes() == before


def test_bench_fronts_update_refuses_rows_scored_on_another_objective(tmp_path):
    """A table's rows were scored against its objective's grid: when the grid now scores otherwise (a zoo rebuilt on
    another machine trains to slightly other weights), --update refuses to mix the two, and the table is left as it was."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
            "--methods", "random search", "--test-preferences", "2"]
    subprocess.run(base, check=True, cwd=ROOT)
    table = tmp_path / "fronts_analytic_T2.json"
    payload = json.loads(table.read_text())
    payload["grid_best_weighted_test"][1] += 1e-6  # as if the closed-form objective had changed by 1e-6 at one preference
    table.write_text(json.dumps(payload))
    before = table.read_bytes()
    done = subprocess.run([*base, "--update", "--first-seed", "1"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "grid's best weighted test scores differ" in done.stderr and "1e-06" in done.stderr
    assert table.read_bytes() == before
    payload["grid_best_weighted_test"][1] -= 1e-6  # the same objective again: accepted
    table.write_text(json.dumps(payload))
    subprocess.run([*base, "--update", "--first-seed", "1"], check=True, cwd=ROOT)
    assert sorted(r["seed"] for r in json.loads(table.read_text())["rows"]) == [0, 1]


def test_bench_fronts_update_is_not_fooled_by_nan_or_another_length(tmp_path):
    """A NaN among the stored (or this run's) best weighted test scores made the largest difference NaN, and
    ``NaN > 1e-9`` is False: every other difference was hidden and the rows of two objectives were mixed. A list of
    another length broadcast (one stored score against every preference's)."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
            "--methods", "random search", "--test-preferences", "2"]
    subprocess.run(base, check=True, cwd=ROOT)
    table = tmp_path / "fronts_analytic_T2.json"
    payload = json.loads(table.read_text())
    scores = payload["grid_best_weighted_test"]
    for stored in ([float("nan"), scores[1] + 1.0], [float("nan"), scores[1]], [scores[0]]):
        table.write_text(json.dumps({**payload, "grid_best_weighted_test": stored}))
        before = table.read_bytes()
        done = subprocess.run([*base, "--update", "--first-seed", "1"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and "grid's best weighted test scores differ" in done.stderr, stored
        assert table.read_bytes() == before


def test_bench_fronts_update_keeps_only_picks_made_with_the_objectives_noisy_flags(tmp_path):
    """A MAP-family row's default pick depends on which metrics were noisy (real evaluations scored by the model
    or by their measurement): every such row records its flags (and the code's commit), and --update refuses to
    keep rows made with other flags, or with none recorded, beside new ones; rerunning them is accepted."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
            "--methods", "MAP (design)", "--sweeps", "", "--test-preferences", "2"]
    subprocess.run(base, check=True, cwd=ROOT)
    table = tmp_path / "fronts_analytic_T2.json"
    payload = json.loads(table.read_text())
    row = payload["rows"][0]
    assert row["noisy"] == [False, False]  # the analytic objective flags no metric
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert row["commit"] in ((head, f"{head}-dirty") if head else (None,))  # the code that made the row
    for flags in ([True, False], None):
        changed = {**row, "noisy": flags} if flags is not None else {k: v for k, v in row.items() if k != "noisy"}
        table.write_text(json.dumps({**payload, "rows": [changed]}))
        before = table.read_bytes()
        done = subprocess.run([*base, "--update", "--first-seed", "1"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and "other noisy flags" in done.stderr and "('MAP (design)', 0)" in done.stderr, flags
        assert table.read_bytes() == before
    subprocess.run([*base, "--update"], check=True, cwd=ROOT)  # the row without flags rerun: nothing is kept, accepted
    assert [r["noisy"] for r in json.loads(table.read_text())["rows"]] == [[False, False]]


def test_bench_fronts_proposal_model_is_recorded_labelled_and_not_mixed(tmp_path):
    """A table made with --proposal-model auto says so in fronts_table.md; a table written before the flag
    existed (no key) counts as the default's: --update adds to it, but not with another proposal model."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
            "--methods", "random search", "--test-preferences", "2"]
    subprocess.run([*base, "--proposal-model", "auto"], check=True, cwd=ROOT)
    table = tmp_path / "fronts_analytic_T2.json"
    assert json.loads(table.read_text())["proposal_model"] == "auto"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--summarize", "--out", str(tmp_path)], check=True, cwd=ROOT)
    assert "analytic T=2 (B=10, 1 seeds, proposal_model=auto)" in (tmp_path / "fronts_table.md").read_text()
    payload = json.loads(table.read_text())
    del payload["proposal_model"]  # as written before --proposal-model existed
    table.write_text(json.dumps(payload))
    before = table.read_bytes()
    done = subprocess.run([*base, "--proposal-model", "auto", "--update", "--first-seed", "1"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "proposal_model" in done.stderr and table.read_bytes() == before
    subprocess.run([*base, "--update", "--first-seed", "1"], check=True, cwd=ROOT)
    updated = json.loads(table.read_text())
    assert updated["proposal_model"] == "gp" and sorted(r["seed"] for r in updated["rows"]) == [0, 1]


def test_bench_fronts_update_may_change_the_proposal_model_only_by_rerunning_every_map_row(tmp_path):
    """The proposal model is MAP's: --update keeps a table's MAP rows of one proposal model. Adding a MAP seed under
    another is refused; rerunning every MAP row under another replaces them all, and the table records the new one."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
            "--methods", "MAP", "--sweeps", "", "--test-preferences", "2"]
    subprocess.run([*base, "--proposal-model", "auto"], check=True, cwd=ROOT)
    table = tmp_path / "fronts_analytic_T2.json"
    before = table.read_bytes()
    done = subprocess.run([*base, "--update", "--first-seed", "1"], cwd=ROOT, capture_output=True, text=True)  # T = 2's default: gp
    assert done.returncode != 0 and "proposal_model" in done.stderr and table.read_bytes() == before
    subprocess.run([*base, "--update"], check=True, cwd=ROOT)  # seed 0, the table's only MAP row, rerun
    updated = json.loads(table.read_text())
    assert updated["proposal_model"] == "gp" and [(r["method"], r["seed"]) for r in updated["rows"]] == [("MAP", 0)]
    assert updated["rows"][0]["proposal_model"] == "gp"  # each MAP row says what it ran, too


def test_bench_fronts_wide_table_bolds_every_tied_best(tmp_path):
    """Two methods whose means differ only by floating-point rounding (0.1 + 0.2 against 0.3) share the
    best of a column: both are bold, a worse one is not."""
    module = _load("_fronts_tables.py", "fronts_tables_bold")
    summary = [{"method": "A", "hv_ratio_mean": 0.9, "pick_regret_mean": 0.1 + 0.2},
               {"method": "B", "hv_ratio_mean": 0.3 * 3, "pick_regret_mean": 0.3},
               {"method": "C", "hv_ratio_mean": 0.8, "pick_regret_mean": 0.4}]
    assert 0.1 + 0.2 != 0.3 and 0.3 * 3 != 0.9
    (tmp_path / "fronts_analytic_T2.json").write_text(json.dumps({"version": 3, "label": "analytic", "tasks": 2, "budget": 22,
                                                                  "seeds": 5, "summary": summary}))
    rows = {line.split(" | ")[0][2:]: line for line in module.wide_table(tmp_path).splitlines()}
    assert rows["A"].endswith("| **0.900** / **0.3** |") and rows["B"].endswith("| **0.900** / **0.3** |")
    assert rows["C"].endswith("| 0.800 / 0.4 |")


def test_bench_fronts_wide_table_names_a_method_run_on_fewer_seeds(tmp_path):
    """A peer run on fewer seeds than the column's (Ax at T = 4: 25 minutes a seed) says so in its own cell;
    the column keeps the others' count (the payload's ``seeds`` is the fewest)."""
    module = _load("_fronts_tables.py", "fronts_tables_seeds")
    summary = [{"method": "A", "hv_ratio_mean": 0.9, "pick_regret_mean": 0.1, "seeds": 5},
               {"method": "B", "hv_ratio_mean": 0.8, "pick_regret_mean": 0.2, "seeds": 2}]
    (tmp_path / "fronts_analytic_T4.json").write_text(json.dumps({"version": 3, "label": "analytic", "tasks": 4, "budget": 60,
                                                                  "seeds": 2, "proposal_model": "auto", "summary": summary}))
    lines = module.wide_table(tmp_path).splitlines()
    assert lines[0] == "| method | analytic T=4 (B=60) |"
    assert lines[2].endswith("| **0.900** / **0.1** |") and lines[3].endswith("| 0.800 / 0.2 (2 seeds) |")


def _load(script: str, name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_fronts_other_task_subset_stays_out_of_the_table(tmp_path):
    """A run on other tasks of a zoo (``--task-names``) is written under its own name, in the zoo's
    order of tasks (any order of the table's own tasks is the table's run), and the table built from
    the folder holds only the table's own column; bad names are refused."""
    module = _load("bench_fronts.py", "bench_fronts_subset")
    names = module.zoo_tasks("lm", 2, "legal,medical")
    assert names == ["medical", "legal"] and module.zoo_tasks("lm", 2, None) == ["code", "medical"]
    assert module.table_path(tmp_path, "lm", 2, "lm", names).name == "fronts_lm_T2_medical+legal.json"
    assert module.table_path(tmp_path, "lm", 2, "lm", module.zoo_tasks("lm", 2, "medical,code")).name == "fronts_lm_T2.json"
    assert module.table_path(tmp_path, "analytic", 2, "analytic", None).name == "fronts_analytic_T2.json"
    for bad, message in (("code,code", "must name 2 different tasks"), ("code,nope", "must name 2 different tasks"),
                         ("code", "must name 2 different tasks")):
        with pytest.raises(ValueError, match=message):
            module.zoo_tasks("lm", 2, bad)
    with pytest.raises(ValueError, match="at most T = 3"):
        module.zoo_tasks("lm", 4, None)
    for name, hv in (("fronts_lm_T2.json", 0.9), ("fronts_lm_T2_medical+legal.json", 0.5)):
        (tmp_path / name).write_text(json.dumps({"version": 3, "label": "lm", "tasks": 2, "budget": 22, "seeds": 5,
                                                 "summary": [{"method": "A", "hv_ratio_mean": hv, "pick_regret_mean": 0.1}]}))
    tables = _load("_fronts_tables.py", "fronts_tables_subset")
    assert [p.name for p in tables.table_files(tmp_path)] == ["fronts_lm_T2.json"]
    table = tables.wide_table(tmp_path)
    assert "| A | **0.900** / **0.1** |" in table and "0.500" not in table


class _FakeResult:
    """What bench_pick_rules reads of a MAP result: a predicted front with std, the real evaluations,
    the model's prediction at them, noisy flags and the default pick."""

    def __init__(self, front, real, model_at_real, noisy=None):
        self.front, self._real, self._model, self.noisy = front, real, model_at_real, noisy

    def real_evaluations(self):
        return self._real

    def predict(self, coeffs, return_std=False):
        assert np.array_equal(coeffs, self._real.coeffs)
        return self._model if return_std else self._model[0]

    def select(self, w, caution=1.0):
        from map_merge.pareto import cautious_pick

        if any(self.noisy or ()):
            front, i = cautious_pick(self.front, w, self._real, caution, posterior=self._model, noisy=self.noisy)
        else:
            front, i = cautious_pick(self.front, w, self._real, caution)
        return front.coeffs[i]


def test_bench_pick_rules_tell_the_rules_apart():
    """Hand-made numbers: the model's best point has mean 0.80 and std 0.10, a real evaluation
    measured 0.75 (between mean - std and mean), the model says 0.70 +- 0.01 there. The default
    (caution 1) hands over the real evaluation; ``over mean``, ``posterior`` and ``best mean`` keep
    the model's point. With the metric noisy the real evaluation is scored by the model's 0.70
    in every rule, and the model's point stays."""
    from map_merge.pareto import ParetoFront

    module = _load("bench_pick_rules.py", "bench_pick_rules_unit")
    front = ParetoFront(np.array([[0.5], [0.9]]), np.array([[0.80], [0.60]]), ("t",), ("max",), std=np.array([[0.10], [0.01]]))
    real = ParetoFront(np.array([[0.2]]), np.array([[0.75]]), ("t",), ("max",))
    model = (np.array([[0.70]]), np.array([[0.01]]))
    chosen = module.picks(_FakeResult(front, real, model), np.array([[1.0]]))
    assert list(chosen) == list(module.RULES)
    assert chosen["caution 1"][0, 0] == 0.2 and chosen["caution 0.5"][0, 0] == 0.5  # 0.80 - 0.05 = 0.75 is not above 0.75
    assert chosen["over mean"][0, 0] == 0.5 and chosen["posterior"][0, 0] == 0.5 and chosen["best mean"][0, 0] == 0.5
    # minimised metric, the same numbers negated: the same picks
    low = ParetoFront(front.coeffs, -front.metrics, ("t",), ("min",), std=front.std)
    chosen = module.picks(_FakeResult(low, ParetoFront(real.coeffs, -real.metrics, ("t",), ("min",)), (-model[0], model[1])), np.array([[1.0]]))
    assert chosen["caution 1"][0, 0] == 0.2 and chosen["over mean"][0, 0] == 0.5
    # a real evaluation above the model's mean replaces the pick under over mean too
    high = ParetoFront(real.coeffs, np.array([[0.85]]), ("t",), ("max",))
    assert module.picks(_FakeResult(front, high, model), np.array([[1.0]]))["over mean"][0, 0] == 0.2
    noisy = module.picks(_FakeResult(front, high, model, noisy=(True,)), np.array([[1.0]]))
    assert noisy["caution 1"][0, 0] == 0.5 and noisy["over mean"][0, 0] == 0.5


def _bench_noisy_pick():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_noisy_pick", ROOT / "benchmarks" / "bench_noisy_pick.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_noisy_pick_settings():
    """Explicit options win over --quick's (they were ignored); the re-evaluations stay inside the budget
    beyond the one-shot design's 6 points (a budget of 14 made MAP (design) fail after the zoo had loaded);
    a pair that is not two different LM domains is refused before anything runs."""
    import argparse

    resolve = _bench_noisy_pick().resolve

    def args(**kw):
        return argparse.Namespace(**{"pairs": "code,legal", "quick": False, "seeds": None, "budget": None, "per_axis": None, **kw})

    s = resolve(args())
    assert (s["pairs"], s["seeds"], s["per_axis"], s["budget"], s["reevaluations"], s["size"]) == ([("code", "legal")], 5, 11, 22, 10, "small")
    s = resolve(args(quick=True, seeds=3, budget=9, per_axis=5))
    assert (s["seeds"], s["per_axis"], s["budget"], s["reevaluations"], s["size"]) == (3, 5, 9, 2, "tiny")
    assert resolve(args(budget=14))["reevaluations"] == 8 and resolve(args(budget=6))["reevaluations"] == 0
    for bad in ("code,legal,medical", "code,code", "code,law", "code", ";", "code,legal;code,legal"):
        with pytest.raises(ValueError, match="--pairs"):
            resolve(args(pairs=bad))
    with pytest.raises(ValueError, match="--budget 5"):
        resolve(args(budget=5))


def test_bench_fronts_update_refuses_to_mix_picks_made_before_noisy_metrics(tmp_path):
    """lm-eval scores are noisy: a MAP-family row written before they changed the default pick (no
    recorded ``noisy`` flags) is not averaged with new rows; --update names it instead."""
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "lm",
            "--metric", "lm_eval", "--tasks", "2", "--sweeps", "", "--test-preferences", "2", "--methods", "random search"]
    subprocess.run(base, check=True, cwd=ROOT)
    path = tmp_path / "fronts_lm_acc_T2.json"
    payload = json.loads(path.read_text())
    old = {**payload["rows"][0], "method": "MAP", "pick_regret": 0.5}  # a MAP row of the older format
    payload["rows"].append(old)
    path.write_text(json.dumps(payload))
    run = subprocess.run([*base, "--update"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "other noisy flags" in run.stderr and "[True, True]" in run.stderr and "('MAP', 0)" in run.stderr
    assert json.loads(path.read_text()) == payload  # the table is untouched
    # flags alike, but predicted before noisy metrics followed their quadratic trend (no noisy_trend): refused too
    payload["rows"][-1] = {**old, "noisy": [True, True]}
    path.write_text(json.dumps(payload))
    run = subprocess.run([*base, "--update"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "noisy_trend" in run.stderr and "('MAP', 0)" in run.stderr
    assert json.loads(path.read_text()) == payload
    payload["rows"][-1] = {**old, "noisy": [True, True], "noisy_trend": 0.5}  # made as now: kept
    path.write_text(json.dumps(payload))
    subprocess.run([*base, "--update"], check=True, cwd=ROOT, capture_output=True)
    assert any(r["method"] == "MAP" and r["pick_regret"] == 0.5 for r in json.loads(path.read_text())["rows"])


def test_bench_fronts_validation_regret_is_the_test_regret_where_validation_is_test(tmp_path):
    """On the analytic problem the validation and test objectives are one function, so every row's validation pick
    regret (the score the methods were given) must equal its test pick regret, for model picks (MAP, evaluated for
    scoring) and best-evaluation picks alike; --summarize tabulates it."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--quick", "--out", str(tmp_path), "--problem", "analytic",
                    "--methods", "MAP,random search", "--test-preferences", "3"], check=True, cwd=ROOT)
    rows = json.loads((tmp_path / "fronts_analytic_T2.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"MAP", "random search"}
    for row in rows:
        assert abs(row["val_pick_regret"] - row["pick_regret"]) < 1e-12, row
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fronts.py"), "--summarize", "--out", str(tmp_path)], check=True, cwd=ROOT)
    assert "| validation pick regret | analytic T=2 |" in (tmp_path / "fronts_table.md").read_text()


def test_pick_regret_scores_validation_and_test_on_their_own_objectives():
    """Validation and test are two different functions on different scales, so a mix-up shows: on a
    1-coefficient grid {0, 0.5, 1} the metrics are (c, 1 - c) on validation and (2 (1 - c), c) on test
    (both maximised). The preference (1, 0) is best at c = 1 on validation (score 1) and at c = 0 on
    test (score 2). Hand-computed regrets of the picks c = 1 and c = 0.5 follow."""
    module = _load("bench_fronts.py", "bench_fronts_regret")
    val = lambda c: np.concatenate([c, 1 - c], axis=1)  # noqa: E731
    test = lambda c: np.concatenate([2 * (1 - c), c], axis=1)  # noqa: E731
    grid = np.array([[0.0], [0.5], [1.0]])
    prefs = np.array([[1.0, 0.0]])
    regret = module.PickRegret(val, test, ("max", "max"), prefs, grid, val(grid), test(grid))
    assert regret.best_val.tolist() == [1.0] and regret.best_test.tolist() == [2.0]
    assert regret.grid_pick == 2.0  # the validation pick c = 1 scores 0 on test
    assert regret.val(np.array([[1.0]])) == 0.0 and regret.test(np.array([[1.0]])) == 2.0
    assert regret.val(np.array([[0.5]])) == 0.5 and regret.test(np.array([[0.5]])) == 1.0
    # the best evaluation by validation among c = 0.5, 1 is c = 1: (test regret 2, validation regret 0)
    assert regret.evaluated(np.array([[0.5], [1.0]]), val(np.array([[0.5], [1.0]]))) == (2.0, 0.0)
    # minimised metrics are oriented before weighting: validation loss (1 - c) makes c = 1 best again
    loss = module.PickRegret(lambda c: 1 - c, lambda c: c, ("min",), np.array([[1.0]]), grid, 1 - grid, grid)
    assert loss.val(np.array([[0.5]])) == 0.5 and loss.test(np.array([[0.0]])) == 0.0 and loss.grid_pick == 1.0


def test_variants_table_ranks_the_map_variants_over_all_seeds(tmp_path):
    """Hand-made tables: MAP's test regret is 0.3 on seeds 0-4 and 0.1 on 5-9 (mean 0.2), Bayesian MAP's 0.25
    throughout, the design's 0.5: MAP ranks 2nd on the first five seeds and 1st on all ten. A table with five
    seeds is left out; the markdown holds the hand-computed means and standard deviations."""
    module = _load("variants_table.py", "variants_table_test")

    def rows(method, values):
        return [{"method": method, "seed": s, "pick_regret": v, "val_pick_regret": v / 2, "hv_ratio": 0.9} for s, v in enumerate(values)]

    full = rows("MAP", [0.3] * 5 + [0.1] * 5) + rows("Bayesian MAP", [0.25] * 10) + rows("MAP (design)", [0.5] * 10)
    full += [{**full[0], "seed": 11, "pick_regret": 9.0}]  # a seed the other variants did not run: left out
    for row in full[20:25]:  # the design's seeds 0-4 from before validation regrets were recorded: no mean of the rest
        del row["val_pick_regret"]
    np.random.default_rng(0).shuffle(full)  # rows in any order: seeds are matched, not counted
    (tmp_path / "fronts_analytic_T3.json").write_text(json.dumps({"label": "analytic", "tasks": 3, "rows": full}))
    short = rows("MAP", [0.1] * 5) + rows("Bayesian MAP", [0.2] * 5) + rows("MAP (design)", [0.3] * 5)
    (tmp_path / "fronts_lm_T2.json").write_text(json.dumps({"label": "lm", "tasks": 2, "rows": short}))
    entries = module.variant_rows(tmp_path)
    assert [e["setting"] for e in entries] == ["analytic T=3"] and entries[0]["seeds"] == list(range(10))
    assert module.rank(entries[0], 5) == 2 and module.rank(entries[0]) == 1
    tied = {**entries[0], "MAP (design)": {**entries[0]["MAP (design)"], "test": entries[0]["MAP"]["test"][::-1].copy()}}
    assert module.rank(tied) == 1 and module.markdown([tied]).count("**0.2 ± 0.1**") == 2  # equal means (summed in another order) tie
    text = module.markdown(entries)
    assert "| analytic T=3 | **0.2 ± 0.1** | 0.5 ± 0 | 0.25 ± 0 | 0.1 / - / 0.125 |" in text and "| 2 → 1 | 10 |" in text
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "variants_table.py"), "--out", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True)
    assert (tmp_path / "variants_table.md").read_text().strip() == text and (tmp_path / "variants_pick_regret.png").stat().st_size > 0


def test_bench_fronts_keeps_finished_runs_of_a_stopped_run_and_skips_them_next_time(tmp_path, monkeypatch):
    """A benchmark stopped after its first run (Ctrl-C) keeps that run in its journal; started again with
    the same settings it runs only the rest, and its table holds the kept row unchanged. A journal of
    other settings is renamed aside, never overwritten."""
    module = _load("bench_fronts.py", "bench_fronts_journal")
    monkeypatch.setattr(sys.modules["_common"], "source_commit", lambda: "abc1234")  # a clean checkout (a dirty one never reuses runs)
    real, calls = module.run_budgeted, []

    def stop_at_second(method, *args, **kwargs):
        calls.append(method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(method, *args, **kwargs)

    argv = ["bench_fronts.py", "--quick", "--out", str(tmp_path), "--problem", "analytic", "--methods", "random search,CMA-ES"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(module, "run_budgeted", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        module.main()
    journal = tmp_path / "fronts_analytic_T2.runs.jsonl"
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [line["key"] for line in lines[1:]] == ["random search|0"] and not (tmp_path / "fronts_analytic_T2.json").exists()
    kept = lines[1]["row"]["row"]
    with journal.open("a") as handle:
        handle.write('{"key": "CMA-ES|0", "row": {"ro')  # a line torn by a kill mid-write: that run is redone
    calls.clear()
    module.main()
    assert calls == ["CMA-ES"]  # the finished run is read back, not run again
    table = json.loads((tmp_path / "fronts_analytic_T2.json").read_text())
    assert [r for r in table["rows"] if r["method"] == "random search"] == [kept]
    assert not journal.exists()  # its rows are in the table now
    # a stopped run of other settings: its journal is kept aside when a new run starts
    monkeypatch.setattr(sys, "argv", argv + ["--budget", "12"])
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        module.main()
    old = journal.read_text()
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(module, "run_budgeted", real)
    module.main()
    aside = sorted(tmp_path.glob("fronts_analytic_T2.runs.*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == old and not journal.exists()


def test_run_journal_keeps_every_journal_it_cannot_read_back(tmp_path, monkeypatch):
    """A header torn by a kill, and two journals of other settings set aside in one second: each is kept
    aside whole (none over another); rows of the same settings are read back."""
    common = _load("_common.py", "common_journal")
    monkeypatch.setattr(common, "source_commit", lambda: "abc1234")
    torn = '{"header": {"ru'
    (tmp_path / "x.runs.jsonl").write_text(torn)
    first = common.RunJournal(tmp_path, "x", {"a": 1})
    first.add("k", {"v": 1.5})
    assert common.RunJournal(tmp_path, "x", {"a": 1}).get("k") == {"v": 1.5}
    common.RunJournal(tmp_path, "x", {"a": 2})  # sets aside the journal holding "k"
    common.RunJournal(tmp_path, "x", {"a": 3})  # and then the empty one of a = 2, maybe within the same second
    aside = [p.read_text() for p in tmp_path.glob("x.runs.*.jsonl")]
    assert len(aside) == 3 and torn in aside and sum('"key": "k"' in text for text in aside) == 1


def test_run_journal_never_deletes_runs_its_table_did_not_take(tmp_path, monkeypatch):
    """A restart with fewer methods or seeds reads back only some runs: closing keeps the journal aside, whole."""
    common = _load("_common.py", "common_journal_close")
    monkeypatch.setattr(common, "source_commit", lambda: "abc1234")
    first = common.RunJournal(tmp_path, "x", {"a": 1})
    first.add("A|0", {"v": 1.0})
    first.add("B|0", {"v": 2.0})
    again = common.RunJournal(tmp_path, "x", {"a": 1})
    assert again.get("B|0") == {"v": 2.0}
    again.close()  # A's run is in no table
    (kept,) = tmp_path.glob("x.runs.*.jsonl")
    assert '"A|0"' in kept.read_text() and not (tmp_path / "x.runs.jsonl").exists()
    whole = common.RunJournal(tmp_path, "y", {"a": 1})
    whole.add("A|0", {"v": 1.0})
    whole.close()  # every run used: the journal goes
    assert not list(tmp_path.glob("y.runs*"))
