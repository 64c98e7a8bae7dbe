import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyNet

import map_merge as mm


def test_function_objective_uses_store_and_counts(tmp_path):
    calls = []

    def fn(c):
        calls.append(len(c))
        return np.stack([c.sum(1), -c[:, 0]], axis=1)

    store = mm.EvaluationStore(tmp_path / "evals.sqlite")
    obj = mm.FunctionObjective(fn, 2, ["sum", "neg"], store=store, key="f")
    coeffs = np.array([[0.1, 0.2], [0.3, 0.4], [0.1, 0.2]])
    out = obj(coeffs)
    np.testing.assert_allclose(out, [[0.3, -0.1], [0.7, -0.3], [0.3, -0.1]])
    assert obj.num_evaluations == 2 and calls == [2]  # duplicate row evaluated once
    again = mm.FunctionObjective(fn, 2, ["sum", "neg"], store=mm.EvaluationStore(tmp_path / "evals.sqlite"), key="f")
    np.testing.assert_array_equal(again(coeffs), out)
    assert again.num_evaluations == 0 and again.num_cached == 3 and calls == [2]
    with pytest.raises(ValueError, match=r"shape \(K, 2\)"):
        obj(np.zeros((2, 3)))


def test_nonfinite_metric_is_an_error_but_finite_results_are_kept(tmp_path):
    store = mm.EvaluationStore()

    def fn(c):
        return np.array([1.0, np.nan]) if c[0] > 0.5 else np.array([c[0], 2.0])

    obj = mm.FunctionObjective(fn, 1, ["a", "b"], batched=False, store=store)
    with pytest.raises(ValueError, match=r"non-finite metric for task\(s\) \['b'\]"):
        obj(np.array([[0.1], [0.9]]))
    assert store.count() == 3  # both tasks of row 0 and the finite task of row 1


def test_model_objective_merges_and_evaluates(tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    idx = torch.tensor([0, 1, 2, 3])
    tasks = {
        "mean": mm.Task(lambda m: m(idx).mean().item()),
        "norm": mm.Task(lambda m: m.lin.weight.norm().item(), sense="min", link="softplus"),
    }
    obj = mm.ModelObjective(TinyNet(), tv, tasks, progress=False)
    coeffs = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.5, 0.1]])
    out = obj(coeffs)
    assert out.shape == (3, 2) and obj.senses == ("max", "min") and obj.links == (None, "softplus")
    for row, c in zip(out, coeffs):
        ref = TinyNet()
        ref.load_state_dict(tv.merge(c))
        ref.eval()
        assert row[0] == pytest.approx(ref(idx).mean().item(), rel=1e-5)
        assert row[1] == pytest.approx(ref.lin.weight.norm().item(), rel=1e-5)
    np.testing.assert_allclose(out[1, 1], fts[0].lin.weight.norm().item(), rtol=1e-5)
    # a different merge method is a different fingerprint
    ties = mm.ModelObjective(TinyNet(), tv, tasks, method="ties", progress=False)
    assert ties.fingerprint() != obj.fingerprint()


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import map_merge as mm

    store_path, log_path = sys.argv[1], sys.argv[2]
    def fn(c):
        with open(log_path, "a") as f:
            f.write(",".join(f"{x:.6f}" for x in c) + "\\n")
        time.sleep(0.3)  # long enough that the test kills it mid-run on a loaded machine
        return np.array([np.sin(3 * c).sum(), np.cos(2 * c).prod()])

    obj = mm.FunctionObjective(fn, 3, ["s", "c"], batched=False, key="resume", store=mm.EvaluationStore(store_path))
    coeffs = mm.sobol_design(3, 16, seed=3)
    out = obj(coeffs)
    np.save(store_path + ".npy", out)
    """
)


def test_killed_run_resumes_without_recomputing(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    store, log = tmp_path / "store.sqlite", tmp_path / "calls.log"
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(log)])
    deadline = time.time() + 60
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = log.read_text().splitlines()
    assert 5 <= len(first) < 16, "the run was not killed mid-way"
    stored = mm.EvaluationStore(store).count()
    assert stored >= 2 * (len(first) - 1)  # every finished evaluation was persisted
    subprocess.run([sys.executable, str(script), str(store), str(log)], check=True)
    second = log.read_text().splitlines()[len(first):]
    resumed = np.load(str(store) + ".npy")
    # nothing stored was recomputed; together both runs evaluated each vector once (+ the one killed mid-call)
    assert len(second) == 16 - stored // 2
    assert not set(first[: stored // 2]) & set(second)
    # same results as a clean run
    clean_store, clean_log = tmp_path / "clean.sqlite", tmp_path / "clean.log"
    subprocess.run([sys.executable, str(script), str(clean_store), str(clean_log)], check=True)
    np.testing.assert_array_equal(resumed, np.load(str(clean_store) + ".npy"))


@pytest.mark.parametrize("bad", [None, "0.9", [0.5], torch.ones(2)])
def test_metric_that_is_not_a_number_names_task_and_coefficients(tiny_models, bad):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    objective = mm.ModelObjective(TinyNet(), tv, {"fine": lambda m: 0.5, "broken": lambda m: bad}, progress=False)
    with pytest.raises(TypeError, match=r"metric of task 'broken' returned .* for coefficients \[0.1, 0.2, 0.3\]; a metric must return a number"):
        objective([[0.1, 0.2, 0.3]])
    ok = mm.ModelObjective(TinyNet(), tv, {"t": lambda m: torch.tensor(0.25), "n": lambda m: np.float32(0.5)}, progress=False)
    np.testing.assert_allclose(ok([[0.1, 0.2, 0.3]]), [[0.25, 0.5]])


def _closure(scale):
    def metric(c):
        return np.asarray(c, dtype=float) * scale

    return metric


def test_function_fingerprints_follow_content_not_names(tmp_path, tiny_models):
    """Two lambdas (same qualified name ``<lambda>``) or two closures over other data must not
    share stored results; a repeated identical function must."""
    store = mm.EvaluationStore(tmp_path / "evals.sqlite")
    first = mm.FunctionObjective(lambda c: c.sum(1, keepdims=True), 2, ["y"], store=store)
    second = mm.FunctionObjective(lambda c: -c.sum(1, keepdims=True), 2, ["y"], store=store)
    assert first.fingerprint() != second.fingerprint()
    coeffs = np.array([[0.25, 0.5]])
    assert first(coeffs)[0, 0] == pytest.approx(0.75)
    assert second(coeffs)[0, 0] == pytest.approx(-0.75) and second.num_cached == 0  # its own result, not first's
    assert mm.FunctionObjective(_closure(1.0), 1, ["y"], batched=False).fingerprint() != \
        mm.FunctionObjective(_closure(2.0), 1, ["y"], batched=False).fingerprint()
    assert mm.FunctionObjective(_closure(1.0), 1, ["y"], batched=False).fingerprint() == \
        mm.FunctionObjective(_closure(1.0), 1, ["y"], batched=False).fingerprint()
    # a model objective whose metrics are plain functions: the same task name, other functions
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    idx = torch.tensor([0, 1, 2, 3])
    up = mm.ModelObjective(TinyNet(), tv, {"t": lambda m: m(idx).mean().item()}, store=store, progress=False)
    down = mm.ModelObjective(TinyNet(), tv, {"t": lambda m: -m(idx).mean().item()}, store=store, progress=False)
    assert up.fingerprint() != down.fingerprint()
    point = np.array([[0.2, 0.3, 0.1]])
    assert down(point)[0, 0] == pytest.approx(-up(point)[0, 0]) and down.num_cached == 0


FUNCTIONS = textwrap.dedent('''
    import sys
    import numpy as np
    import map_merge as mm

    OFFSET = np.array([0.5, -0.25])

    def shifted(c):
        return (c + OFFSET).sum(1, keepdims=True)

    objectives = [mm.FunctionObjective(shifted, 2, ["y"]), mm.FunctionObjective(lambda c: c.sum(1, keepdims=True), 2, ["y"]),
                  mm.FunctionObjective(lambda c: c.prod(1, keepdims=True), 2, ["y"])]
    print(" ".join(o.fingerprint() for o in objectives))
''')


def test_function_fingerprints_agree_across_processes(tmp_path):
    script = tmp_path / "functions.py"
    script.write_text(FUNCTIONS)
    root = str(Path(__file__).resolve().parents[1])
    runs = []
    for seed in ("1", "2"):  # another process, another string-hash seed
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done.stdout.split())
    assert runs[0] == runs[1] and len(set(runs[0])) == 3  # equal functions agree, different ones differ
    script.write_text(FUNCTIONS.replace("[0.5, -0.25]", "[0.5, -0.5]"))  # the data a function reads is part of it
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    changed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=root).stdout.split()
    assert changed[0] != runs[0][0] and changed[1:] == runs[0][1:]


def test_for_tasks_subsets_share_the_parents_stored_results(tmp_path, tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    idx = torch.tensor([0, 1, 2, 3])
    store = mm.EvaluationStore(tmp_path / "evals.sqlite")
    class Probe:  # a task adapter: a metric carrying the fingerprint of its data
        fingerprint, sense = "probe-0123", "max"

        def __call__(self, model):
            return model(idx).mean().item()

    tasks = {"mean": Probe(), "norm": mm.Task(lambda m: m.lin.weight.norm().item(), sense="min")}
    whole = mm.ModelObjective(TinyNet(), tv, tasks, store=store, progress=False)
    point = np.array([[0.2, 0.3, 0.1]])
    values = whole(point)
    part = whole.for_tasks(["norm"])
    assert part.fingerprint() == whole.fingerprint()
    np.testing.assert_array_equal(part(point), values[:, 1:])  # read back, not evaluated again
    assert part.num_evaluations == 0 and part.num_cached == 1
    assert store.count() == 2  # one row per task and vector, never a second copy under another key
