import concurrent.futures as cf
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite's models and surrogates are tiny: one intra-op thread is faster than two fighting over
# small matrices (several times so on a busy machine), and subprocesses (benchmarks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers), every test that starts a Ray runtime
    runs on one worker, one after another (``--dist loadgroup``): two local Ray clusters on a
    2-core machine would fight over its CPUs."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session", autouse=True)
def shared_zoo_cache(tmp_path_factory):
    """One zoo cache for the whole test session (each zoo is built once), never the user's; under
    pytest-xdist one for all workers (a zoo cache is written whole beside its folder and renamed into
    place; the first complete build is the one every worker loads: map_merge/zoo/cache_files.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.getbasetemp().parent / "zoo-cache"
        folder.mkdir(exist_ok=True)
    else:
        folder = tmp_path_factory.mktemp("zoo-cache")
    previous = os.environ.get("MAP_MERGE_CACHE")
    os.environ["MAP_MERGE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MAP_MERGE_CACHE", None)
    else:
        os.environ["MAP_MERGE_CACHE"] = previous


class TinyNet(nn.Module):
    """Small model with a float buffer, an integer buffer and tied weights."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.out = nn.Linear(3, 5, bias=False)
        if tie:
            self.out.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        return self.out(h) + self.norm(self.lin(h)).sum(-1, keepdim=True)


@pytest.fixture
def tiny_models():
    torch.manual_seed(0)
    base = TinyNet()
    fts = []
    for _ in range(3):
        model = TinyNet()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            model.norm.running_mean.add_(torch.randn(4))
            model.norm.num_batches_tracked.fill_(7)
        fts.append(model)
    return base, fts


def quadratic_pair(c: np.ndarray) -> np.ndarray:
    """Two concave quadratics of two coefficients with a genuine trade-off."""
    c = np.atleast_2d(c)
    a = 0.9 - 0.5 * (c[:, 0] - 0.8) ** 2 - 0.3 * (c[:, 1] - 0.1) ** 2 - 0.1 * c[:, 0] * c[:, 1]
    b = 0.85 - 0.4 * (c[:, 1] - 0.7) ** 2 - 0.5 * (c[:, 0] - 0.2) ** 2 + 0.05 * c[:, 0] * c[:, 1]
    return np.stack([a, b], axis=1)


def quadratic_three(c: np.ndarray) -> np.ndarray:
    """Three objectives of three coefficients: f_i = 0.9 - |c - p_i|^2 / 2 (accuracy-like)."""
    c = np.atleast_2d(c)
    optima = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9]])
    return 0.9 - 0.5 * ((c[:, None, :] - optima[None]) ** 2).sum(-1)


def grid(num: int, per_axis: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    axis = np.linspace(low, high, per_axis)
    return np.stack([m.reshape(-1) for m in np.meshgrid(*([axis] * num), indexing="ij")], axis=1)


class ThreadPair:
    """An executor with two evaluations at once in driver threads: what a RayExecutor with two
    workers looks like to the library (``num_workers``, ``submit``, ``map``)."""

    num_workers = 2

    def __init__(self):
        self.pool = cf.ThreadPoolExecutor(2)

    def submit(self, fn, item):
        return self.pool.submit(fn, item)

    def map(self, fn, items):
        futures = {self.submit(fn, x): i for i, x in enumerate(items)}
        for f in cf.as_completed(futures):
            yield futures[f], f.result()


@pytest.fixture
def two_threads():
    """A :class:`ThreadPair`, shut down after the test."""
    executor = ThreadPair()
    yield executor
    executor.pool.shutdown()
