"""Nested merging: merge many tasks pairwise in stages, one 2-D MAP per stage.

A pool starts with one member per task (coefficient vector ``e_i``, its single-task score). Each
stage takes the two members with the closest scores (or the most similar task vectors), runs a
2-D MAP on ``x * a + y * b`` (``a``, ``b``: the members' coefficient vectors over the original
tasks), scores each member's tasks by their preference-weighted mean, picks the 2-D front point
maximising ``p_A * s_A + p_B * s_B`` (``p``: the groups' summed preferences) and puts the merged
member back. Merges compose linearly, so every member is one coefficient vector over the
original tasks and no intermediate weights are ever materialised. The result is one model for
one preference, reported as such a vector.

Cost: ``T - 1`` stages of ``samples_per_stage + 1`` evaluations, each scoring only the tasks of
the two members merged, against plain MAP's ``(T+1)(T+2)`` evaluations of all ``T`` tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .map import MAP, MAPResult, call_objective
from .function_objective import FunctionObjective
from .pareto import check_noisy, check_preference

__all__ = ["nested_merge", "NestedResult", "NestedStage"]

log = logging.getLogger(__name__)


@dataclass
class NestedStage:
    """One pairwise stage: the two members (task indices), their 2-D MAP and the choice."""

    left: list[int]
    right: list[int]
    result: MAPResult
    choice: np.ndarray  # (2,) stage coefficients (x, y); (2G,) with G coefficient groups
    coeffs: np.ndarray  # (T,) the merged member over the original tasks ((T*G,) with groups)
    score: float  # real preference-weighted score of the merged member on its tasks
    task_evaluations: int


@dataclass
class NestedResult:
    """Outcome of :func:`nested_merge`.

    Attributes:
        coeffs: ``(T,)`` task-arithmetic coefficients of the final model (``(T*G,)`` with groups).
        metrics: ``(T,)`` its real metrics on every task (one last full evaluation).
        stages: the tree of stages in order.
        num_evaluations: merged models evaluated (stages, choices and the final check).
        task_evaluations: (model, task) evaluations, the unit that costs time.
    """

    coeffs: np.ndarray
    metrics: np.ndarray
    preference: np.ndarray
    stages: list[NestedStage] = field(default_factory=list)
    num_evaluations: int = 0
    task_evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "coeffs": self.coeffs.tolist(), "metrics": self.metrics.tolist(), "preference": self.preference.tolist(),
            "num_evaluations": self.num_evaluations, "task_evaluations": self.task_evaluations,
            "stages": [{"left": s.left, "right": s.right, "choice": s.choice.tolist(), "coeffs": s.coeffs.tolist(), "score": s.score,
                        "task_evaluations": s.task_evaluations} for s in self.stages],
        }


def nested_merge(
    objective_for: Callable[[Sequence[int]], Callable[[np.ndarray], np.ndarray]],
    num_tasks: int,
    preference: Sequence[float],
    samples_per_stage: int = 20,
    pairing: str = "closest_score",
    similarity: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    schedule: str = "sequential",
    num_groups: int | None = None,
) -> NestedResult:
    """Merge ``num_tasks`` tasks pairwise in ``T - 1`` stages for one preference.

    Args:
        objective_for: ``objective_for(task_indices)`` returns an objective taking full
            coefficient vectors ``(K, T)`` and returning those tasks' metrics ``(K, len(indices))``
            (higher is better, unless its ``senses`` say ``"min"``: those are negated inside the
            stages), e.g. ``lambda idx: objective.for_tasks([names[i] for i in idx])``.
        num_tasks: T >= 2.
        preference: ``(T,)`` non-negative weights, not all zero.
        samples_per_stage: real evaluations of each 2-D MAP (at least 6).
        pairing: ``"closest_score"`` (the authors': members whose scores are closest, so that
            neither drowns the other) or ``"similar_vectors"`` (highest mean cosine similarity
            between the members' tasks; needs ``similarity``, e.g. ``TaskVectors.cosine_similarity()``).
        bounds: the stage coefficients' box.
        schedule: ``"sequential"`` (the authors': one pair at a time; the merged member may be
            paired again at once) or ``"levels"``: each level pairs the pool's members into
            disjoint pairs (greedily by ``pairing``; an odd one out waits for the next level),
            as a balanced tree. On an executor with several workers (e.g. a
            :class:`~map_merge.RayExecutor`) the pairs of a level run at the same time, as do the
            ``T`` single-task evaluations at the start. Results do not depend on the executor.
        num_groups: G, the coefficient groups per task (:class:`~map_merge.Groups`): coefficient
            vectors have ``T x G`` entries, task-major; a member is such a vector, and a stage scales
            each member's group ``g`` by its own coefficient (a ``2G``-coefficient stage MAP, so
            ``samples_per_stage`` must be at least ``(2G+1)(2G+2)/2``). Default: the objectives'
            ``num_coeffs / T`` (1 without groups).
    """
    if int(num_tasks) < 2:
        raise ValueError(f"nested merging needs at least 2 tasks, got {num_tasks}")
    weights = check_preference(preference, num_tasks)
    if pairing not in ("closest_score", "similar_vectors"):
        raise ValueError(f"unknown pairing {pairing!r}; choose 'closest_score' or 'similar_vectors'")
    if pairing == "similar_vectors" and (similarity is None or np.shape(similarity) != (num_tasks, num_tasks)):
        raise ValueError(f"pairing='similar_vectors' needs similarity, a ({num_tasks}, {num_tasks}) matrix")
    if schedule not in ("sequential", "levels"):
        raise ValueError(f"unknown schedule {schedule!r}; choose 'sequential' or 'levels'")
    probe = objective_for([0])
    if num_groups is None:
        coefficients = int(getattr(probe, "num_coeffs", num_tasks))
        if coefficients % num_tasks:
            raise ValueError(f"the objective takes {coefficients} coefficients for {num_tasks} tasks: not a whole number of "
                             "coefficient groups per task (pass num_groups=, or an objective with T x G coefficients)")
        num_groups = coefficients // num_tasks
    groups = int(num_groups)
    if groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    stage_dim = 2 * groups
    eye = np.kron(np.eye(num_tasks), np.ones(groups))  # (T, T*G): task i's coefficient 1 in each of its groups
    # evaluations run concurrently only on an executor with several workers (never into one live model)
    width = int(getattr(getattr(probe, "executor", None), "num_workers", 1))
    # pool members: (task indices, coefficient vector over the original tasks, score)
    result = NestedResult(np.zeros(num_tasks * groups), np.zeros(num_tasks), weights)

    def single_score(i: int) -> float:
        single = objective_for([i])
        return float(call_objective(single, eye[i : i + 1], 1)[0, 0] * _signs(single, 1)[0])

    scores = _run_all(single_score, list(range(num_tasks)), width)
    result.num_evaluations += num_tasks
    result.task_evaluations += num_tasks
    pool: list[tuple[list[int], np.ndarray, float]] = [([i], eye[i].copy(), scores[i]) for i in range(num_tasks)]

    def group_score(metrics: np.ndarray, tasks: list[int], columns: list[int]) -> np.ndarray:
        w = weights[tasks]
        w = w / w.sum() if w.sum() > 0 else np.full(len(tasks), 1.0 / len(tasks))
        return metrics[:, columns] @ w

    def run_stage(job: tuple) -> tuple:
        (left, a, _), (right, b, _), stage_index, snapshot = job
        tasks = left + right
        scorer = objective_for(tasks)
        left_cols, right_cols = list(range(len(left))), list(range(len(left), len(tasks)))
        spent = {"models": 0}

        def scaled(xy: np.ndarray) -> np.ndarray:
            """Full coefficient vectors: member a's group g scaled by xy[:, g], b's by xy[:, G + g]."""
            x, y = np.tile(xy[:, :groups], num_tasks), np.tile(xy[:, groups:], num_tasks)
            return x * a + y * b

        def stage_objective(xy: np.ndarray) -> np.ndarray:
            full = scaled(xy)
            metrics = call_objective(scorer, full, len(tasks)) * _signs(scorer, len(tasks))
            spent["models"] += len(xy)
            return np.stack([group_score(metrics, left, left_cols), group_score(metrics, right, right_cols)], axis=1)

        flags = check_noisy(getattr(scorer, "noisy", None), len(tasks))  # a group's score is noisy when one of its metrics is
        noisy = [any(flags[c] for c in left_cols), any(flags[c] for c in right_cols)]
        wrapped = FunctionObjective(stage_objective, stage_dim, ["left", "right"], key=f"nested-stage-{stage_index}", noisy=noisy)
        stage = MAP(num_samples=samples_per_stage, bounds=bounds, link=_stage_link(scorer, snapshot), design="sobol",
                    seed=seed + stage_index).fit(wrapped, stage_dim)
        p_left, p_right = weights[left].sum(), weights[right].sum()
        if p_left + p_right <= 0:
            p_left = p_right = 1.0
        choice = stage.front.select([p_left, p_right])
        merged = scaled(choice[None])[0]
        real = stage_objective(choice[None])[0]
        combined = float((p_left * real[0] + p_right * real[1]) / (p_left + p_right))
        log.info("nested stage %d: %s + %s -> c=%s (score %.4f)", stage_index, left, right, np.round(merged, 3).tolist(), combined)
        return NestedStage(left, right, stage, choice, merged, combined, spent["models"] * len(tasks)), spent["models"]

    stage_index = 0
    while len(pool) > 1:
        pairs = [_pick_pair(pool, pairing, similarity)] if schedule == "sequential" else _disjoint_pairs(pool, pairing, similarity)
        snapshot = list(pool)
        jobs = [(pool[i], pool[j], stage_index + k, snapshot) for k, (i, j) in enumerate(pairs)]
        outcomes = _run_all(run_stage, jobs, width)
        used = {index for pair in pairs for index in pair}
        pool = [m for k, m in enumerate(pool) if k not in used]
        for stage, models in outcomes:
            result.num_evaluations += models
            result.task_evaluations += stage.task_evaluations
            result.stages.append(stage)
            pool.append((stage.left + stage.right, stage.coeffs, stage.score))
        stage_index += len(pairs)
    result.coeffs = pool[0][1]
    everything = list(range(num_tasks))
    result.metrics = call_objective(objective_for(everything), result.coeffs[None], num_tasks)[0]
    result.num_evaluations += 1
    result.task_evaluations += num_tasks
    return result


def _signs(objective: Any, num: int) -> np.ndarray:
    """+1 for metrics to maximise, -1 for those to minimise (``objective.senses``; default max)."""
    senses = getattr(objective, "senses", None) or ("max",) * num
    return np.array([-1.0 if s == "min" else 1.0 for s in senses])


def _stage_link(scorer: Any, pool: list) -> str:
    """A stage's group scores are weighted means of its tasks' metrics: keep the sigmoid link only
    when every metric is accuracy-like (the objective's ``links``; without them, when every score
    so far lies in [0, 1])."""
    links = tuple(getattr(scorer, "links", None) or ())
    if links and all(link is not None for link in links):
        return "sigmoid" if set(links) == {"sigmoid"} and (_signs(scorer, len(links)) > 0).all() else "identity"
    return "sigmoid" if all(0.0 <= member[2] <= 1.0 for member in pool) else "identity"


def _run_all(fn: Callable[[Any], Any], jobs: list, width: int) -> list:
    """``[fn(job) for job in jobs]``, in threads when the executor behind ``fn`` has several
    workers (the threads only wait on it); results in the order of ``jobs``."""
    if width <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(width, len(jobs)), thread_name_prefix="nested") as pool:
        return list(pool.map(fn, jobs))


def _disjoint_pairs(pool, pairing: str, similarity: np.ndarray | None) -> list[tuple[int, int]]:
    """Greedy disjoint pairs of pool indices, best pair first (by ``pairing``)."""
    left = list(range(len(pool)))
    pairs = []
    while len(left) > 1:
        i, j = _pick_pair([pool[k] for k in left], pairing, similarity)
        pairs.append((left[i], left[j]))
        left = [k for n, k in enumerate(left) if n not in (i, j)]
    return pairs


def _pick_pair(pool, pairing: str, similarity: np.ndarray | None) -> tuple[int, int]:
    best, pair = np.inf, (0, 1)
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            if pairing == "closest_score":
                cost = abs(pool[i][2] - pool[j][2])
            else:
                cost = -float(np.mean(similarity[np.ix_(pool[i][0], pool[j][0])]))
            if cost < best:
                best, pair = cost, (i, j)
    return pair
