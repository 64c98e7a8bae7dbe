"""Quadratic surrogates of one task's metric as a function of the merging coefficients.

``m(c) ~= link(q(c))``, ``q(c) = c^T A c + b^T c + e`` (all squares, all pairwise products, linear
terms, intercept: ``P = (T+1)(T+2)/2`` weights), with link ``sigmoid`` (metrics in [0, 1]),
``softplus`` (positive metrics, e.g. losses) or ``identity``.

Fit: closed-form least squares on link-transformed targets (clipped away from the link's
bounds), then a short nonlinear least-squares refinement on the metric's own scale
(``scipy.optimize.least_squares``). Diagnostics: R^2, RMSE, leave-one-out RMSE from the hat
matrix of the linearised model (exact for the identity link). Uncertainty: a Gaussian
(Laplace) posterior over the weights, ``N(w, s^2 (J^T J)^-1)`` with ``J`` the Jacobian at the fit
and ``s^2`` the residual variance; :meth:`QuadraticSurrogate.predict` gives the predictive
standard deviation of the mean function and :meth:`QuadraticSurrogate.sample` draws functions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares

from .designs import num_quadratic_params, quadratic_features  # the basis lives with its size (no import circle)

__all__ = ["QuadraticSurrogate", "FitDiagnostics", "quadratic_features", "LINKS", "SurrogateFitWarning", "predict_all", "torch_predict_all", "SurrogateSet", "safe_quadratics"]

log = logging.getLogger(__name__)

LINKS = ("sigmoid", "softplus", "identity")
_EPS = {"sigmoid": 1e-3, "softplus": 1e-6, "identity": 0.0}


class SurrogateFitWarning(UserWarning):
    """A surrogate fits its data badly (low R^2)."""


def _torch_features(coeffs: torch.Tensor) -> torch.Tensor:
    rows, cols = np.triu_indices(coeffs.shape[-1])
    ones = torch.ones(coeffs.shape[:-1] + (1,), dtype=coeffs.dtype, device=coeffs.device)
    return torch.cat([ones, coeffs, coeffs[..., rows] * coeffs[..., cols]], dim=-1)


def _link(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if name == "softplus":
        return np.logaddexp(0.0, z)
    return z


def _link_grad(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        s = _link("sigmoid", z)
        return s * (1.0 - s)
    if name == "softplus":
        return _link("sigmoid", z)
    return np.ones_like(z)


def _link_inverse(name: str, y: np.ndarray) -> np.ndarray:
    eps = _EPS[name]
    if name == "sigmoid":
        y = np.clip(y, eps, 1.0 - eps)
        return np.log(y) - np.log1p(-y)
    if name == "softplus":
        y = np.maximum(y, eps)
        return y + np.log(-np.expm1(-y))
    return y


def _torch_link(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "softplus":
        return torch.nn.functional.softplus(z)
    return z


@dataclass(frozen=True)
class FitDiagnostics:
    """Fit quality on the metric's own scale.

    ``loo_rmse`` is NaN when some point has leverage 1 (as many points as weights)."""

    r2: float
    rmse: float
    loo_rmse: float
    num_samples: int
    num_params: int
    residual_std: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


class QuadraticSurrogate:
    """One task's surrogate ``link(quadratic(c))``.

    Args:
        link: ``"sigmoid"``, ``"softplus"`` or ``"identity"``.
        ridge: L2 penalty on the non-intercept weights (0 = plain least squares).
        refine: run the nonlinear refinement on the metric's scale (non-identity links).
        r2_warn: warn with :class:`SurrogateFitWarning` when the in-sample R^2 is below this.
        name: task name used in messages.
    """

    def __init__(self, link: str = "sigmoid", ridge: float = 0.0, refine: bool = True, r2_warn: float = 0.5, name: str = "task") -> None:
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; choose one of {LINKS}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.link = link
        self.ridge = float(ridge)
        self.refine = refine
        self.r2_warn = r2_warn
        self.name = name
        self.weights: np.ndarray | None = None
        self.covariance: np.ndarray | None = None
        self.diagnostics: FitDiagnostics | None = None
        self.num_coeffs: int | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, coeffs: np.ndarray, values: np.ndarray) -> "QuadraticSurrogate":
        """Fit to ``coeffs: (K, T)`` and measured ``values: (K,)``."""
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        num, num_coeffs = coeffs.shape
        num_params = num_quadratic_params(num_coeffs)
        if values.shape[0] != num:
            raise ValueError(f"task {self.name!r}: {num} coefficient vectors but {values.shape[0]} values")
        if not (np.isfinite(coeffs).all() and np.isfinite(values).all()):
            raise ValueError(f"task {self.name!r}: coefficients and values must be finite (found NaN/inf)")
        distinct = len(np.unique(np.round(coeffs, 12), axis=0))
        if distinct < num_params:
            raise ValueError(
                f"task {self.name!r}: a quadratic in {num_coeffs} coefficients has {num_params} parameters but only "
                f"{distinct} distinct samples were given; evaluate at least {num_params} distinct, well-spread points "
                f"(default budget: {2 * num_params})"
            )
        self._check_range(values)
        phi = quadratic_features(coeffs)
        rank = np.linalg.matrix_rank(phi)
        if rank < num_params:
            raise ValueError(
                f"task {self.name!r}: the design is rank-deficient for a quadratic (rank {rank} < {num_params}); "
                "the sampled points lie on a lower-dimensional set: use a space-filling design"
            )
        penalty = np.full(num_params, self.ridge)
        penalty[0] = 0.0
        target = _link_inverse(self.link, values)
        weights = np.linalg.solve(phi.T @ phi + np.diag(penalty), phi.T @ target) if self.ridge else np.linalg.lstsq(phi, target, rcond=None)[0]
        if self.link != "identity" and self.refine:
            weights = self._refine(phi, values, weights, penalty)
        self.num_coeffs = num_coeffs
        self.weights = weights
        self._posterior(phi, values, penalty)
        if self.diagnostics.r2 < self.r2_warn:
            warnings.warn(
                f"surrogate for task {self.name!r} fits badly: R^2 = {self.diagnostics.r2:.3f} < {self.r2_warn} "
                f"(RMSE {self.diagnostics.rmse:.4g}); its predicted front is unreliable: add samples or narrow the box",
                SurrogateFitWarning,
                stacklevel=2,
            )
        return self

    def _check_range(self, values: np.ndarray) -> None:
        low, high = values.min(), values.max()
        if self.link == "sigmoid" and (low < 0.0 or high > 1.0):
            raise ValueError(
                f"task {self.name!r}: the sigmoid link needs metrics in [0, 1] (accuracy-like), got range "
                f"[{low:.4g}, {high:.4g}]; use link='identity' or 'softplus'"
            )
        if self.link == "softplus" and low < 0.0:
            raise ValueError(f"task {self.name!r}: the softplus link needs non-negative metrics, got minimum {low:.4g}; use link='identity'")

    def _refine(self, phi: np.ndarray, values: np.ndarray, start: np.ndarray, penalty: np.ndarray) -> np.ndarray:
        root = np.sqrt(penalty)

        def residual(w: np.ndarray) -> np.ndarray:
            r = _link(self.link, phi @ w) - values
            return np.concatenate([r, root * w]) if self.ridge else r

        def jacobian(w: np.ndarray) -> np.ndarray:
            j = _link_grad(self.link, phi @ w)[:, None] * phi
            return np.concatenate([j, np.diag(root)]) if self.ridge else j

        result = least_squares(residual, start, jac=jacobian, method="trf", max_nfev=200, x_scale="jac")
        before = np.sum(residual(start) ** 2)
        return result.x if np.sum(result.fun**2) <= before else start

    def _posterior(self, phi: np.ndarray, values: np.ndarray, penalty: np.ndarray) -> None:
        z = phi @ self.weights
        fitted = _link(self.link, z)
        resid = fitted - values
        num, num_params = phi.shape
        rss = float(resid @ resid)
        total = float(np.sum((values - values.mean()) ** 2))
        r2 = 1.0 - rss / total if total > 1e-300 else (1.0 if rss < 1e-20 else 0.0)
        jac = _link_grad(self.link, z)[:, None] * phi
        precision = jac.T @ jac + np.diag(penalty)
        inverse = np.linalg.pinv(precision)
        leverage = np.einsum("ij,jk,ik->i", jac, inverse, jac)
        loo = np.nan if np.any(leverage > 1.0 - 1e-8) else float(np.sqrt(np.mean((resid / (1.0 - leverage)) ** 2)))
        dof = num - num_params
        sigma2 = rss / dof if dof > 0 else float(np.var(values))
        sigma2 = max(sigma2, 1e-12)
        self.covariance = sigma2 * inverse
        self.covariance = 0.5 * (self.covariance + self.covariance.T)
        self.diagnostics = FitDiagnostics(
            r2=float(r2),
            rmse=float(np.sqrt(rss / num)),
            loo_rmse=loo,
            num_samples=int(num),
            num_params=int(num_params),
            residual_std=float(np.sqrt(sigma2)),
        )

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self, coeffs: np.ndarray) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError(f"surrogate for task {self.name!r} is not fitted yet: call fit(coeffs, values) first")
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        if coeffs.shape[1] != self.num_coeffs:
            raise ValueError(f"surrogate for task {self.name!r} takes {self.num_coeffs} coefficients, got shape {coeffs.shape}")
        return coeffs

    def predict(self, coeffs: np.ndarray, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted metric ``(K,)`` for ``coeffs: (K, T)``; with ``return_std`` also the posterior
        standard deviation of the mean function ``(K,)`` (delta method)."""
        coeffs = self._check_fitted(coeffs)
        phi = quadratic_features(coeffs)
        z = phi @ self.weights
        mean = _link(self.link, z)
        if not return_std:
            return mean
        grad = _link_grad(self.link, z)[:, None] * phi
        var = np.einsum("ij,jk,ik->i", grad, self.covariance, grad)
        return mean, np.sqrt(np.maximum(var, 0.0))

    def sample(self, coeffs: np.ndarray, num_samples: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        """Posterior function draws ``(S, K)`` at ``coeffs: (K, T)``."""
        coeffs = self._check_fitted(coeffs)
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(self.weights, self.covariance, size=num_samples, method="eigh")
        return _link(self.link, quadratic_features(coeffs) @ draws.T).T

    def torch_predict(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Differentiable prediction ``(..., )`` for a tensor ``coeffs: (..., T)``."""
        weights = torch.as_tensor(self.weights, dtype=coeffs.dtype, device=coeffs.device)
        return _torch_link(self.link, _torch_features(coeffs) @ weights)

    @property
    def hessian(self) -> np.ndarray:
        """``(T, T)`` matrix ``2A`` of the quadratic ``q`` (on the link scale)."""
        num = self.num_coeffs
        rows, cols = np.triu_indices(num)
        quad = self.weights[1 + num :]
        a = np.zeros((num, num))
        a[rows, cols] = quad
        return a + a.T

    def __repr__(self) -> str:
        fit = f", R^2={self.diagnostics.r2:.3f}" if self.diagnostics else ""
        return f"QuadraticSurrogate(task={self.name!r}, link={self.link!r}{fit})"


class SurrogateSet:
    """M quadratic surrogates as one predictive model ``coeffs (K, T) -> (K, M)``.

    Any object with this interface (``num_coeffs``, ``predict(coeffs, return_std)``,
    ``torch_predict(coeffs)``) can be searched for a front (see :func:`map_merge.map.surrogate_front`)."""

    def __init__(self, surrogates: Sequence[QuadraticSurrogate]) -> None:
        self.surrogates = list(surrogates)
        self.num_coeffs = self.surrogates[0].num_coeffs
        self._torch = torch_predict_all(self.surrogates)

    def predict(self, coeffs: np.ndarray, return_std: bool = False):
        if not return_std:
            return predict_all(self.surrogates, coeffs)
        outs = [s.predict(coeffs, return_std=True) for s in self.surrogates]
        return np.stack([o[0] for o in outs], axis=1), np.stack([o[1] for o in outs], axis=1)

    def torch_predict(self, coeffs: torch.Tensor) -> torch.Tensor:
        return self._torch(coeffs)


def predict_all(surrogates: Sequence[QuadraticSurrogate], coeffs: np.ndarray) -> np.ndarray:
    """Predictions ``(K, M)`` of M surrogates at ``coeffs: (K, T)`` (features computed once)."""
    weights = np.stack([s.weights for s in surrogates], axis=1)
    z = quadratic_features(coeffs) @ weights
    return np.stack([_link(s.link, z[:, j]) for j, s in enumerate(surrogates)], axis=1)


def torch_predict_all(surrogates: Sequence[QuadraticSurrogate]):
    """A differentiable ``f(coeffs: (..., T)) -> (..., M)`` over all M surrogates (float64)."""
    weights = torch.tensor(np.stack([s.weights for s in surrogates], axis=1), dtype=torch.float64)
    links = [s.link for s in surrogates]
    masks = {name: torch.tensor([link == name for link in links]) for name in set(links)}

    def fn(coeffs: torch.Tensor) -> torch.Tensor:
        z = _torch_features(coeffs) @ weights.to(coeffs.device)
        if len(masks) == 1:
            return _torch_link(links[0], z)
        return sum(torch.where(mask.to(coeffs.device), _torch_link(name, z), torch.zeros((), dtype=z.dtype)) for name, mask in masks.items())

    return fn


def safe_quadratics(coeffs: np.ndarray, metrics: np.ndarray, links: Sequence[str], names: Sequence[str], ridge: float) -> list[QuadraticSurrogate]:
    """One quadratic per metric, quietly; a link that does not fit the metric's range (a sigmoid on
    values outside [0, 1]) falls back to identity."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j, link in enumerate(links):
            try:
                out.append(QuadraticSurrogate(link=link, ridge=ridge, r2_warn=-np.inf, name=names[j]).fit(coeffs, metrics[:, j]))
            except ValueError:
                out.append(QuadraticSurrogate(link="identity", ridge=ridge, r2_warn=-np.inf, name=names[j]).fit(coeffs, metrics[:, j]))
    return out
