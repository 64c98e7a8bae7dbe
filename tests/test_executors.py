"""Executors: the Ray work queue (local runtime, 2 CPUs), fault handling, asynchronous sampling.

Ground truth: analytic objectives evaluated directly, the concurrency measured inside the
evaluator, and the store's own rows."""

import concurrent.futures as cf
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyNet

from map_merge import BayesianMAP, EvaluationError, EvaluationStore, FunctionObjective, ModelObjective, RayExecutor, TaskVectors, WorkerError, nested_merge
from map_merge.baselines import mobo_search
from map_merge import evaluate_async
from map_merge.executors import LocalExecutor, Recipe

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402  (the copy Ray serialises with)

for _module in (__name__, "conftest"):  # workers cannot import the test modules: ship their code by value
    cloudpickle.register_pickle_by_value(sys.modules[_module])


def three_quadratics(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    targets = np.array([[1.0, 0.0, 0.2], [0.0, 1.0, 0.5], [0.3, 0.2, 1.0]])
    return 1.0 - ((c[None, :] - targets) ** 2).sum(axis=1) / 3.0


class KillOnce:
    """Kills its worker process (``os._exit``) on the first call of the whole run; logs every call."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, c: np.ndarray) -> np.ndarray:
        with open(os.path.join(self.folder, "calls.log"), "a") as log:
            log.write(repr(np.asarray(c).tolist()) + "\n")
        try:  # atomic: exactly one call of the run finds no marker
            os.close(os.open(os.path.join(self.folder, "killed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os._exit(1)
        time.sleep(0.05)
        return three_quadratics(c)


def always_dies(c):
    os._exit(3)


class HangOnce:
    """Hangs (an hour) on the first call of the whole run, as a stuck data loader would; logs every call."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, c: np.ndarray) -> np.ndarray:
        with open(os.path.join(self.folder, "calls.log"), "a") as log:
            log.write(repr(np.asarray(c).tolist()) + "\n")
        try:
            os.close(os.open(os.path.join(self.folder, "hung"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return three_quadratics(c)
        time.sleep(3600)


def always_hangs(c):
    time.sleep(3600)


def hangs_in_setup(base):
    time.sleep(3600)


def run_base(base, parts, item):
    return base(item)


class KillThenHang:
    """Kills its worker on the first call of the run, hangs on every later one."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, c: np.ndarray) -> np.ndarray:
        try:
            os.close(os.open(os.path.join(self.folder, "killed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(3600)
        os._exit(1)


def counted_tiny_net(log_path: str):
    """A model factory that logs each build with its process id."""
    with open(log_path, "a") as log:
        log.write(f"{os.getpid()}\n")
    torch.manual_seed(0)
    return TinyNet()


class Readout:
    """Task ``i`` of a TinyNet: a concave score of its output's column ``i`` on a fixed probe."""

    def __init__(self, column: int) -> None:
        self.column = column

    def __call__(self, model) -> float:
        out = model(torch.tensor([0, 1, 2, 3, 4]))[:, self.column]
        return float(1.0 - ((out - 0.5) ** 2).mean())


def raises_inside(c):
    def deep_helper(value):
        raise ValueError(f"bad coefficient {value:.3f}")

    return deep_helper(float(c[0]))


@pytest.fixture(scope="module")
def executor():
    # "accel": a custom resource standing in for a GPU (one unit), to test fractional placement without one
    ex = RayExecutor(num_workers=2, init_kwargs={"num_cpus": 2, "object_store_memory": 100 * 2**20, "resources": {"accel": 1}})
    yield ex
    ex.shutdown()


pytestmark = pytest.mark.ray


def test_ray_equals_local_on_a_model_objective(executor, tiny_models):
    base, fts = tiny_models
    tv = TaskVectors.from_models(base, fts)
    probe = torch.tensor([0, 1, 2, 3, 4])

    tasks = {"sum": lambda m: float(m(probe).sum()), "sq": lambda m: float((m(probe) ** 2).mean())}
    coeffs = np.random.default_rng(0).uniform(0, 1, (7, 3))
    import copy

    local = ModelObjective(copy.deepcopy(base), tv, tasks, progress=False)(coeffs)
    remote_obj = ModelObjective(copy.deepcopy(base), tv, tasks, progress=False, executor=executor)
    remote = remote_obj(coeffs)
    np.testing.assert_array_equal(remote, local)
    # and both equal the merge done by hand
    for c, row in zip(coeffs, local):
        model = copy.deepcopy(base)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for ci, ft in zip(c, fts):
            for k, v in ft.state_dict().items():
                if v.dtype.is_floating_point:
                    state[k] = state[k] + float(ci) * (v - base.state_dict()[k])
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            np.testing.assert_allclose(row, [tasks["sum"](model), tasks["sq"](model)], rtol=1e-5, atol=1e-5)
    # futures: one at a time, in any order
    futures = [remote_obj.submit(c) for c in coeffs[:3]]
    np.testing.assert_array_equal(np.array([f.result() for f in futures]), local[:3])


def test_map_yields_every_index_once_after_a_worker_is_killed(executor, tmp_path):
    before = executor.deaths
    store = EvaluationStore(tmp_path / "store.db")
    objective = FunctionObjective(KillOnce(str(tmp_path)), 3, ["a", "b", "c"], batched=False, store=store, executor=executor, key="kill")
    coeffs = np.random.default_rng(1).uniform(0, 1, (9, 3))
    seen = []
    for index, value in executor.map(KillOnce(str(tmp_path)), list(coeffs)):
        seen.append(index)
        np.testing.assert_allclose(value, three_quadratics(coeffs[index]))
    assert sorted(seen) == list(range(9))  # each once, none lost
    assert executor.deaths == before + 1
    # through the objective and its store: every result once, no duplicate rows
    (tmp_path / "killed").unlink()
    out = objective(coeffs[::-1] + 0.01)
    np.testing.assert_allclose(out, np.array([three_quadratics(c) for c in coeffs[::-1] + 0.01]))
    rows = sqlite3.connect(tmp_path / "store.db").execute("SELECT COUNT(*), COUNT(DISTINCT coeffs || task) FROM evaluations").fetchone()
    assert rows == (27, 27)
    assert objective.num_evaluations == 9
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 9 + 1 + 9 + 1  # two runs of nine, each with one call lost to the kill
    assert executor.deaths == before + 2


def test_worker_that_keeps_dying_gives_a_clear_error(executor):
    executor.num_workers  # the local runtime is up; this second executor joins it (zero CPUs: the first holds both)
    with RayExecutor(num_workers=1, resources_per_worker={"CPU": 0}, max_retries=1) as ex:
        with pytest.raises(WorkerError, match=r"evaluating \[0\.25, 0\.5\] failed: its worker died 2 times"):
            list(ex.map(always_dies, [np.array([0.25, 0.5])]))


def rendezvous(folder):
    """Check in, then wait until four calls have checked in: only calls running at the same time
    all get past this (a call that waited in vain returns -1)."""
    os.close(os.open(os.path.join(folder, str(os.getpid())), os.O_CREAT))
    for _ in range(600):
        if len(os.listdir(folder)) >= 4:
            return os.getpid()
        time.sleep(0.05)
    return -1


def test_fractional_resources_place_several_workers_on_one_device(executor, tmp_path):
    executor.num_workers
    with RayExecutor(resources_per_worker={"accel": 0.25, "CPU": 0}) as quarter:  # four per unit, counted from the cluster
        assert quarter.num_workers == 4
        pids = [value for _, value in quarter.map(rendezvous, [str(tmp_path)] * 4)]
        assert -1 not in pids and len(set(pids)) == 4  # all four ran at once, in four processes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_workers_evaluate_on_their_gpu(tiny_models):
    base, fts = tiny_models
    tv = TaskVectors.from_models(base, fts)
    probe = torch.tensor([0, 1, 2, 3, 4])
    tasks = {"device": lambda m: float(next(m.parameters()).is_cuda), "sum": lambda m: float(m(probe.to(next(m.parameters()).device)).sum())}
    import copy

    local = ModelObjective(copy.deepcopy(base), tv, tasks, progress=False)(np.full((2, 3), 0.3))
    with RayExecutor(resources_per_worker={"GPU": 0.5, "CPU": 0}) as ex:
        remote = ModelObjective(copy.deepcopy(base), tv, tasks, progress=False, executor=ex, device="auto")(np.full((2, 3), 0.3))
    assert (remote[:, 0] == 1).all()
    np.testing.assert_allclose(remote[:, 1], local[:, 1], rtol=1e-4)


def test_evaluator_exception_carries_the_worker_traceback(executor):
    objective = FunctionObjective(raises_inside, 2, ["x"], batched=False, executor=executor)
    with pytest.raises(EvaluationError) as info:
        objective(np.array([[0.125, 0.5]]))
    message = str(info.value)
    assert "bad coefficient 0.125" in message and "deep_helper" in message and "[0.125, 0.5]" in message


def test_async_bayesian_map_keeps_w_in_flight_and_spends_the_budget(executor, two_threads):
    lock = threading.Lock()
    live = {"now": 0, "max": 0}

    def watched(c):  # runs in the driver's threads: concurrency counted at the evaluator itself
        with lock:
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
        time.sleep(0.02)
        with lock:
            live["now"] -= 1
        return three_quadratics(c)

    objective = FunctionObjective(watched, 3, ["a", "b", "c"], batched=False, executor=two_threads, links=["identity"] * 3)
    result = BayesianMAP(budget=14, seed=0, link="identity").fit(objective, 3)
    assert result.settings["asynchronous"] and result.settings["max_in_flight"] == 2
    assert live["max"] == 2  # W in flight, never more
    assert objective.num_evaluations == 14 and len(result.samples) == 14
    np.testing.assert_allclose(result.samples.metrics, np.array([three_quadratics(c) for c in result.samples.coeffs]))
    assert sorted(result.samples.round.tolist())[-1] == 14 - 12  # 12 initial points (P + 2), then one per proposal

    # the same on Ray workers
    ray_objective = FunctionObjective(three_quadratics, 3, ["a", "b", "c"], batched=False, executor=executor)
    trace_result = mobo_search(ray_objective, 3, budget=10, initial=6)
    assert ray_objective.num_evaluations == 10 and len(trace_result.coeffs) == 10


def test_evaluate_async_bounds_in_flight_with_a_store_hit():
    calls = []

    def f(c):
        calls.append(c.copy())
        return three_quadratics(c)

    store = EvaluationStore()
    objective = FunctionObjective(f, 3, ["a", "b", "c"], batched=False, store=store)
    objective(np.full((1, 3), 0.5))  # stored before: proposing it again costs nothing
    proposals = iter([np.full(3, 0.5), np.full(3, 0.25), np.full(3, 0.75)])
    trace = evaluate_async(objective, np.eye(3), lambda x, y, p: next(proposals), budget=6, num_workers=1)
    assert len(trace.coeffs) == 6 and trace.max_in_flight == 1
    assert len(calls) == 1 + 5  # the stored point was not evaluated again
    np.testing.assert_allclose(trace.metrics, np.array([three_quadratics(c) for c in trace.coeffs]))


def test_evaluate_async_refuses_an_empty_design_instead_of_spinning():
    import threading

    objective = FunctionObjective(three_quadratics, 3, ["a", "b", "c"], batched=False)
    outcome = []

    def run():
        try:
            evaluate_async(objective, np.zeros((0, 3)), lambda x, y, p: np.full(3, 0.5), budget=3)
        except ValueError as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)  # the old loop spun forever at 100% CPU: bound the wait
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and len(outcome) == 1
    assert "the initial design is empty (shape (0, 3))" in str(outcome[0]) and "at least one initial point" in str(outcome[0])
    assert objective.num_evaluations == 0
    trace = evaluate_async(objective, np.zeros((0, 3)), lambda x, y, p: np.full(3, 0.5), budget=0)  # nothing to spend: fine
    assert len(trace.coeffs) == 0


@pytest.mark.parametrize("width", [1, 2])
def test_evaluate_async_spends_the_budget_with_a_repeating_proposer(width, two_threads):
    calls = []

    def f(c):
        calls.append(c.copy())
        time.sleep(0.01)
        return three_quadratics(c)

    executor = LocalExecutor() if width == 1 else two_threads
    objective = FunctionObjective(f, 3, ["a", "b", "c"], batched=False, executor=executor)
    same = np.array([0.5, 0.25, 0.75])
    trace = evaluate_async(objective, np.eye(3), lambda x, y, p: same, budget=8, num_workers=width)
    # a repeated point is submitted again and counted: eight rows, submissions 0..7 each once
    assert len(trace.coeffs) == 8 and sorted(trace.order.tolist()) == list(range(8))
    assert sum(np.array_equal(c, same) for c in trace.coeffs) == 5
    np.testing.assert_allclose(trace.metrics, np.array([three_quadratics(c) for c in trace.coeffs]))
    assert len(trace.in_flight) == 8 and trace.max_in_flight <= width
    assert 3 + 1 <= len(calls) <= 8  # a repeat is answered by the evaluation in flight, or evaluated again


def test_evaluate_async_names_task_and_vector_of_a_non_finite_metric_at_once():
    calls = []

    def f(c):
        calls.append(c.copy())
        return np.array([np.nan if c[0] > 0.9 else 1.0, 2.0])

    objective = FunctionObjective(f, 2, ["loss", "acc"], batched=False)
    proposals = iter([np.array([0.95, 0.5])] + [np.array([0.1 * i, 0.2]) for i in range(9)])
    with pytest.raises(ValueError, match=r"non-finite metric for task\(s\) \{'loss': nan\} at coefficient vector \[0\.95, 0\.5\]"):
        evaluate_async(objective, np.array([[0.0, 0.0]]), lambda x, y, p: next(proposals), budget=10, num_workers=1)
    assert len(calls) == 2  # raised when the bad result came back, not at the end of the budget


def test_hung_evaluation_is_timed_out_requeued_and_finishes(executor, tmp_path):
    coeffs = np.random.default_rng(3).uniform(0, 1, (4, 3))
    before = (executor.timeouts, executor.deaths)
    executor.timeout_s, executor.max_retries = 2.0, 1  # read at each dispatch: this test's bound
    try:
        out = FunctionObjective(HangOnce(str(tmp_path)), 3, ["a", "b", "c"], batched=False, executor=executor)(coeffs)
        assert (executor.timeouts, executor.deaths) == (before[0] + 1, before[1])
        executor.max_retries = 0
        with pytest.raises(WorkerError, match=r"evaluating \[0\.25, 0\.5\] failed: it timed out \(timeout_s=2\) 1 time \(max_retries=0\)"
                                              r": worker .*: timed out after timeout_s=2 s"):
            list(executor.map(always_hangs, [np.array([0.25, 0.5])]))
    finally:
        executor.timeout_s, executor.max_retries = None, 2
    np.testing.assert_array_equal(out, FunctionObjective(three_quadratics, 3, ["a", "b", "c"], batched=False)(coeffs))  # as a local run
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 5 and calls.count(calls[0]) == 2  # the hung vector ran again, every other once


def test_shutdown_resolves_every_future_within_seconds(executor, tmp_path):
    executor.num_workers
    ex = RayExecutor(num_workers=2, resources_per_worker={"CPU": 0}, max_retries=5)
    hung = ex.submit(always_hangs, np.array([0.1]))
    requeued = ex.submit(KillThenHang(str(tmp_path)), np.array([0.2]))
    queued = [ex.submit(three_quadratics, np.full(3, 0.1 * i)) for i in range(2)]
    deadline = time.time() + 600  # Ray starts actors slowly on a loaded 2-core machine
    while ex.deaths < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert ex.deaths == 1  # the second job's worker died: it is re-queued (running, not cancellable)
    start = time.time()
    ex.shutdown()
    assert time.time() - start < 30
    for future in [hung, requeued, *queued]:
        assert future.done()
        assert future.cancelled() or isinstance(future.exception(), cf.CancelledError)
    assert all(f.cancelled() for f in queued)


def test_prepare_with_a_hung_setup_replaces_the_worker_and_names_it(executor):
    assert RayExecutor().load_timeout_s == 3600.0  # bounded by default
    executor.num_workers
    with RayExecutor(num_workers=1, resources_per_worker={"CPU": 0}, load_timeout_s=1.0, placement_timeout_s=600) as ex:
        assert list(ex.map(three_quadratics, [np.full(3, 0.5)]))[0][0] == 0  # placed and working
        start = time.time()
        with pytest.raises(WorkerError, match=r"preparing the objective failed: worker 0 \(pid \d+, .*\) did not finish setting it "
                                              r"up within load_timeout_s=1 s; it was killed and replaced"):
            ex.prepare(Recipe(run_base, "a base whose set-up hangs", setup=hangs_in_setup))
        assert time.time() - start < 30 and ex.timeouts == 1
        assert list(ex.map(three_quadratics, [np.full(3, 0.5)]))[0][1] == pytest.approx(three_quadratics(np.full(3, 0.5)))  # a new worker
        assert ex.stats()["workers"][0]["pid"] not in (None, "?") and ex.num_workers == 1
        assert len(ex.prepare(Recipe(run_base, three_quadratics))) == 1  # a set-up that finishes


def test_replacement_that_cannot_be_placed_fails_its_job(executor):
    executor.num_workers
    with RayExecutor(num_workers=1, resources_per_worker={"CPU": 0}) as ex:
        assert list(ex.map(three_quadratics, [np.full(3, 0.5)]))[0][0] == 0  # placed and working
        ex.resources = {"CPU": 0, "a_node_that_is_gone": 1}  # replacements now ask for what no node has
        ex.placement_timeout_s = 2.0
        with pytest.raises(WorkerError, match=r"evaluating \[0\.25, 0\.5\] failed: no worker is left to run it.*"
                                              r"could not be placed within placement_timeout_s=2 s"):
            list(ex.map(always_dies, [np.array([0.25, 0.5])]))
        with pytest.raises(WorkerError, match="no worker is left"):
            ex.submit(three_quadratics, np.full(3, 0.5)).result(timeout=10)


def test_nested_merging_on_ray_builds_each_workers_model_once(executor, tiny_models, tmp_path):
    import functools

    base, fts = tiny_models
    tv = TaskVectors.from_models(base, fts[:2])
    builds = tmp_path / "builds.log"
    factory = functools.partial(counted_tiny_net, str(builds))
    tasks = {"t0": Readout(0), "t1": Readout(3)}
    objective = ModelObjective(factory, tv, tasks, progress=False, executor=executor)
    names = list(tasks)
    # subsets [t0] and [t1] (at once, on both workers), then [t0, t1]: three objectives, one live model
    result = nested_merge(lambda idx: objective.for_tasks([names[i] for i in idx]), 2, [1, 2], samples_per_stage=6,
                          schedule="levels")
    pids = builds.read_text().split()
    assert 1 <= len(pids) <= executor.num_workers and len(set(pids)) == len(pids)  # one model per worker, shared by every subset
    assert str(os.getpid()) not in pids  # and none in the driver
    local = ModelObjective(factory, tv, tasks, progress=False)
    np.testing.assert_allclose(result.metrics, local(result.coeffs)[0], rtol=1e-6)


def test_nested_levels_run_pairs_concurrently_and_match_local(executor):
    def objective_for(executor_):
        base = FunctionObjective(lambda c: np.stack([1 - (c[:, i] - 0.6) ** 2 - 0.2 * c.sum(1) ** 2 / 4 for i in range(4)], 1), 4,
                                 ["a", "b", "c", "d"], key="nested-four")

        def pick(indices):
            cols = list(indices)
            return FunctionObjective(lambda c, cols=cols: base.fn(np.atleast_2d(c))[0, cols], 4, [f"t{i}" for i in cols],
                                     batched=False, executor=executor_, key=f"pick-{cols}")

        return pick

    local = nested_merge(objective_for(LocalExecutor()), 4, [1, 1, 1, 1], samples_per_stage=8, schedule="levels")
    remote = nested_merge(objective_for(executor), 4, [1, 1, 1, 1], samples_per_stage=8, schedule="levels")
    np.testing.assert_allclose(remote.coeffs, local.coeffs)
    assert [(s.left, s.right) for s in remote.stages] == [(s.left, s.right) for s in local.stages]
    assert len(local.stages) == 3 and len(local.stages[0].left + local.stages[0].right + local.stages[1].left + local.stages[1].right) == 4


DRIVER = textwrap.dedent('''
    import sys, time
    import numpy as np
    from map_merge import EvaluationStore, FunctionObjective, RayExecutor

    LOG = sys.argv[2]  # read here: the function runs on workers with their own argv

    def f(c):
        with open(LOG, "a") as log:
            log.write(repr(np.asarray(c).tolist()) + "\\n")
        time.sleep(0.3)
        return np.array([c.sum(), (c ** 2).sum()])

    coeffs = np.linspace(0, 1, 24).reshape(12, 2)
    with RayExecutor(num_workers=2, init_kwargs={"num_cpus": 2}) as ex:
        objective = FunctionObjective(f, 2, ["s", "q"], batched=False, store=EvaluationStore(sys.argv[1]), executor=ex, key="driver")
        objective(coeffs)
        print("DONE", objective.num_evaluations, objective.num_cached, flush=True)
''')


def test_driver_killed_and_restarted_recomputes_nothing_stored(tmp_path):
    script, db, log = tmp_path / "driver.py", tmp_path / "store.db", tmp_path / "calls.log"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_ADDRESS": ""}
    errors = open(tmp_path / "first.err", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(log)], start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=errors)
    stored: set = set()
    deadline = time.time() + 180
    while time.time() < deadline and len(stored) < 5:
        time.sleep(0.05)
        try:
            stored = {r[0] for r in sqlite3.connect(db).execute("SELECT coeffs_json FROM evaluations")}
        except sqlite3.Error:
            pass
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray runtime it started
    proc.wait()
    errors.close()
    assert log.exists(), (tmp_path / "first.err").read_text()[-3000:]
    stored = {r[0] for r in sqlite3.connect(db).execute("SELECT coeffs_json FROM evaluations")}
    assert 5 <= len(stored) < 12
    calls_before = len(log.read_text().splitlines())
    done = subprocess.run([sys.executable, str(script), str(db), str(log)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"DONE {12 - len(stored)} {len(stored)}" in done.stdout
    second = [line for line in log.read_text().splitlines()[calls_before:]]
    import json

    assert not {json.dumps(json.loads(line)) for line in second} & {json.dumps(json.loads(s)) for s in stored}
    rows = sqlite3.connect(db).execute("SELECT COUNT(*), COUNT(DISTINCT coeffs) FROM evaluations").fetchone()
    assert rows == (24, 12)


@pytest.mark.parametrize("command, preference, expected", [("map", [1, 3], [0.25, 0.75]), ("nested", [3, 1], [0.75, 0.25])])
def test_cli_with_a_ray_field_runs_on_workers_and_finds_the_analytic_optimum(executor, tmp_path, capsys, command, preference, expected):
    import json

    from map_merge.cli import main
    from test_plots_cli import _own_models

    executor.num_workers  # runtime up; the run's executor joins it with zero-CPU workers (the fixture's hold both CPUs)
    fields = {**_own_models(tmp_path), "out": str(tmp_path / "out"), "preference": preference, "schedule": "levels",
              "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 0}}}
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(fields))
    assert main([command, "--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0].split("\nwrote")[0])
    np.testing.assert_allclose(summary["coeffs"], expected, atol=0.03)  # c = p / sum(p) for 1 - |w - e_i|^2
    rows = sqlite3.connect(tmp_path / "out" / "evaluations.sqlite").execute("SELECT COUNT(*), COUNT(DISTINCT coeffs || task) FROM evaluations").fetchone()
    assert rows[0] == rows[1] > 0


def test_ray_field_errors_name_the_key(tmp_path):
    import json

    from map_merge.config import ConfigError, load_config
    from test_plots_cli import _own_models

    for ray_field, message in [({"workers": 2}, "field 'ray' has unknown key 'workers'"),
                               ({"num_workers": "2"}, "field 'ray.num_workers' must be a int"),
                               ({"resources_per_worker": {"GPU": -1}}, "field 'ray.resources_per_worker.GPU' must be a non-negative number")]:
        config = tmp_path / "run.yaml"
        config.write_text(json.dumps({**_own_models(tmp_path), "ray": ray_field}))
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_config(config)
