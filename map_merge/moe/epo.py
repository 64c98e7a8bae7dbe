"""Exact Pareto Optimal (EPO) search: task weights from a small linear program.

Given per-task gradients ``G: (T, P)`` of the trainable parameters, losses ``l: (T,)`` and a
preference ``r: (T,)``, EPO chooses weights ``alpha`` on the simplex so that a step along
``sum_i alpha_i grad L_i`` moves the losses towards the ray where ``r * l`` is balanced (when off
it) or decreases every loss (when on it). The LP is solved with ``scipy.optimize.linprog``; if it
fails, ``alpha = r / sum(r)`` (linear scalarisation).

EPO's ray is defined by the tasks the preference weights: a task with ``r_i = 0`` gets
``alpha_i = 0`` and the LP runs over the others (at a corner of the simplex, ``alpha = r``: the
one preferred task alone). Without this, a zero entry makes every ``r * l`` ratio unbalanced and
the LP's objective vanish, and any feasible alpha (possibly another task's) would be returned.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linprog

__all__ = ["epo_weights"]

log = logging.getLogger(__name__)


def epo_weights(grads: np.ndarray, losses: np.ndarray, preference: np.ndarray, eps: float = 1e-4) -> tuple[np.ndarray, bool]:
    """EPO task weights ``alpha: (T,)`` and whether the LP succeeded.

    Args:
        grads: ``(T, P)`` per-task gradients.
        losses: ``(T,)`` positive task losses.
        preference: ``(T,)`` non-negative preference.
    """
    grads = np.asarray(grads, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    r = np.asarray(preference, dtype=np.float64)
    if np.any(r < 0) or not r.sum() > 0:
        raise ValueError(f"preference must be non-negative with a positive sum, got {r.tolist()}")
    support = r > 0
    if not support.all():
        # EPO over the preferred tasks only; the others get weight 0
        alpha = np.zeros_like(r)
        if support.sum() == 1:
            alpha[support] = 1.0
            return alpha, True
        sub, ok = epo_weights(grads[support], losses[support], r[support], eps)
        alpha[support] = sub
        return alpha, ok
    num = len(losses)
    fallback = r / r.sum()
    gram = grads @ grads.T
    weighted = r * losses
    if not np.all(np.isfinite(gram)) or weighted.sum() <= 0 or np.any(losses <= 0):
        return fallback, False
    normed = weighted / weighted.sum()
    log_term = np.log(np.maximum(num * normed, 1e-300))
    mu = float(np.sum(normed * log_term))
    anchor = r * (log_term - mu)
    direction = gram @ anchor
    a_eq, b_eq = np.ones((1, num)), np.array([1.0])
    if mu > eps:
        # maximise alpha^T C a, keep C alpha >= rhs on the non-improving coordinates
        if np.any(direction > 0):
            rhs = direction.copy()
            rhs[direction > 0] = -np.inf
            rhs[np.argmax(weighted)] = 0.0
        else:
            rhs = np.zeros(num)
        keep = np.isfinite(rhs)
        a_ub, b_ub = -gram[keep], -rhs[keep]
        objective = -direction
    else:
        # balanced: descend every loss as much as possible
        bound = min(0.0, float(direction.max()))
        a_ub = np.concatenate([-direction[None, :], -gram])
        b_ub = np.concatenate([[-bound], np.zeros(num)])
        objective = -gram.sum(axis=1)
    try:
        solution = linprog(objective, A_ub=a_ub if len(a_ub) else None, b_ub=b_ub if len(a_ub) else None,
                           A_eq=a_eq, b_eq=b_eq, bounds=[(0.0, None)] * num, method="highs")
    except ValueError as error:  # malformed problem (e.g. non-finite entries)
        log.debug("EPO LP raised %s; falling back to linear scalarisation", error)
        return fallback, False
    if solution.status != 0 or solution.x is None:
        return fallback, False
    alpha = np.clip(solution.x, 0.0, None)
    return alpha / alpha.sum(), True
