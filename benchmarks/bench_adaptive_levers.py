"""The levers of MAP's adaptive default, each measured against the default at equal real evaluations.

Every variant spends the same budget (22 at T = 2, 40 at T = 3, 60 at T = 4) from the same seeds.
Scores against a dense grid of real evaluations (as ``bench_fronts.py``): ``hv_ratio`` of the
variant's own evaluations over the grid front's (reference 1% beyond the grid front's nadir) and
``pick_regret`` of its model's picks for 5-8 preferences, scored on the test split (the function
itself for ``analytic``); ``propose_median_s``: median seconds per proposed point.

Variants (what changes against ``default``, ``MAP(budget=B)``):

- ``experts first`` / ``no experts``: the starting design with the T one-hot vectors (the
  fine-tuned models) or Sobol points alone (the default takes the first on task vectors, the second
  on a black box: the variant is the other one).
- ``initial 4`` / ``initial 10``: the starting design's size (default ``max(6, 2T)``).
- ``fixed noise``: near-interpolating GPs (``noise="fixed"``) instead of a fitted noise level.
- ``quadratic mean``: the quadratic surrogates as the GPs' mean (:class:`~map_merge.BayesianMAP`,
  ``acquisition="ehvi"``, same budget, no re-evaluations).
- ``quadratic kernel``: a quadratic term added to the kernel (a Bayesian quadratic regression plus
  the Matern GP), not shipped: measured by swapping the model class.
- ``multi-output``: one Kronecker multi-task GP over all metrics (correlated tasks), not shipped.
- ``log outputs``: GPs on the logarithm of positive minimised metrics (losses), not shipped.
- ``final picks``: the last T + 1 evaluations on the model's picks (the T ends of the front, each
  metric alone, and the equal preference; the default spends T, on the ends).
- ``no ends``: ``final=0``, proposals to the end of the budget, no evaluation on the picks for the
  front's ends (the default below T = 4 until 2026-12-07; from T = 4 on the default: skipped there).
- ``quadratic+gp picks``: the default's samples, the front (and picks) searched on quadratic
  surrogates plus residual GPs instead of the GPs alone (no evaluation differs).
- ``auto proposals``: ``proposal_model="auto"``, proposals under the model 5-fold cross-validation
  prefers (constant-mean GPs or quadratic + GP), chosen again every 4 evaluations (the default from
  T = 4 on: skipped there). ``gp proposals``: ``proposal_model="gp"``, constant-mean GPs throughout
  (the default below T = 4: skipped there; at T >= 4 the default until 2026-12-07). The variants that
  swap the GP class (``quadratic kernel``, ``multi-output``, ``log outputs``) propose under it
  throughout (``proposal_model="gp"``); where the default spends no evaluation on the front's ends
  (T >= 4), these variants and ``gp proposals`` spend none either (``final=0``), so that only the
  model differs. Each row records the proposal model it ran.
- ``no average``: the starting design without the average merge (every coefficient 1 / T; at
  T = 2 the box's centre, Ax's first trial), the default before 2026-12-07.
- ``average at every T``: the average merge in the starting design at T >= 3 too (MAP adds it at
  T = 2 only).
- ``more restarts``: the acquisition optimiser with 20 restarts from 1024 raw samples (Ax's
  settings) instead of 6 from 512.
- ``observed front``: with two metrics, qLogEHVI over the *evaluated* front instead of qLogNEHVI
  over the front of the model's posterior at the evaluated points (the default before 2026-12-07).
- ``previous default``: ``no average`` and ``observed front`` together, without the ends
  (``final=0``) and with GP proposals at every T (MAP's default until 2026-12-07).
- ``qNParEGO`` (T >= 4): random Chebyshev scalarisations (botorch's qLogNParEGO) instead of
  expected hypervolume improvement, not shipped.

    python benchmarks/bench_adaptive_levers.py --problem lm --tasks 2 --out benchmarks/results
    python benchmarks/bench_adaptive_levers.py --problem lm --tasks 3 --seeds 3 --out benchmarks/results
    python benchmarks/bench_adaptive_levers.py --problem analytic --tasks 2 --out benchmarks/results
    python benchmarks/bench_adaptive_levers.py --problem analytic --tasks 3 --variants "default,auto proposals,final picks,quadratic mean" --out benchmarks/results
    python benchmarks/bench_adaptive_levers.py --problem analytic --tasks 4 --variants "default,gp proposals,more restarts,qNParEGO" --out benchmarks/results
    python benchmarks/bench_adaptive_levers.py --problem vision --tasks 2 --seeds 10 --variants "default,no average,observed front,previous default,more restarts" --out benchmarks/results
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _common import RunJournal, parser, table, write  # noqa: E402
from bench_fronts import BUDGET, GRID, TASKS, analytic, test_preferences  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge import acquisition, adaptive, gp_model, plots  # noqa: E402
from map_merge.adaptive import proposal_model_for  # noqa: E402
from map_merge.pareto import check_noisy, orient, pareto_mask  # noqa: E402

VARIANTS = ("default", "experts first", "no experts", "initial 4", "initial 10", "fixed noise", "quadratic mean", "quadratic kernel",
            "multi-output", "log outputs", "final picks", "quadratic+gp picks", "auto proposals", "no average", "average at every T",
            "observed front", "previous default", "more restarts", "qNParEGO", "gp proposals", "no ends")


def _fit_or_keep(mll) -> None:
    """Fit a marginal likelihood's hyperparameters quietly; a failed fit keeps the starting values."""
    from botorch.fit import fit_gpytorch_mll

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit_gpytorch_mll(mll)
        except Exception:  # noqa: BLE001 - keep the starting values
            pass


class QuadraticKernelGP(gp_model.GPModel):
    """GPModel whose kernel is Matern-5/2 plus a scaled quadratic polynomial kernel (a Bayesian
    quadratic regression beside the GP), refitted."""

    def __init__(self, coeffs, metrics, bounds, noise="infer", warm_start=None):
        super().__init__(coeffs, metrics, bounds, noise=noise)
        from gpytorch.kernels import AdditiveKernel, PolynomialKernel, ScaleKernel
        from gpytorch.mlls import SumMarginalLogLikelihood

        for gp in self.gp.models:
            gp.covar_module = AdditiveKernel(gp.covar_module, ScaleKernel(PolynomialKernel(power=2))).to(torch.float64)
        self.gp.train()
        _fit_or_keep(SumMarginalLogLikelihood(self.gp.likelihood, self.gp))
        self.gp.eval()
        self._alpha = {}


class MultiOutputGP(gp_model.GPModel):
    """One Kronecker multi-task GP over all metrics (their correlation learnt); same interface."""

    def __init__(self, coeffs, metrics, bounds, noise="infer", warm_start=None):
        from botorch.models import KroneckerMultiTaskGP
        from botorch.models.transforms import Normalize, Standardize
        from gpytorch.mlls import ExactMarginalLogLikelihood

        self.num_coeffs, self.num_metrics, self.noise = coeffs.shape[1], metrics.shape[1], noise
        self.bounds = (float(bounds[0]), float(bounds[1]))
        box = torch.tensor([[self.bounds[0]] * self.num_coeffs, [self.bounds[1]] * self.num_coeffs], dtype=torch.float64)
        x, y = torch.tensor(coeffs, dtype=torch.float64), torch.tensor(metrics, dtype=torch.float64)
        self.gp = KroneckerMultiTaskGP(x, y, input_transform=Normalize(self.num_coeffs, bounds=box), outcome_transform=Standardize(self.num_metrics))
        _fit_or_keep(ExactMarginalLogLikelihood(self.gp.likelihood, self.gp))
        self.gp.eval()

    def torch_predict(self, coeffs):
        shape = coeffs.shape
        mean = self.gp.posterior(coeffs.reshape(-1, shape[-1])).mean
        return mean.reshape(shape[:-1] + (mean.shape[-1],))

    def predict(self, coeffs, return_std=False):
        return gp_model.predict_in_chunks(self.torch_predict, lambda x: self.gp.posterior(x).variance.clamp_min(0).sqrt(), coeffs, return_std)


class LogOutputGP(gp_model.GPModel):
    """GPModel fitted to log(metric) for positive metrics (losses); predictions, posterior samples
    and picks in metric units (exp of the log-space mean and samples)."""

    def __init__(self, coeffs, metrics, bounds, noise="infer", warm_start=None):
        metrics = np.asarray(metrics, dtype=np.float64)
        self.log_mask = torch.tensor((metrics > 0).all(axis=0))
        super().__init__(coeffs, np.where(self.log_mask.numpy(), np.log(np.maximum(metrics, 1e-300)), metrics), bounds, noise=noise)

    def _to_metric(self, values):
        return torch.where(self.log_mask, torch.exp(values), values)

    def torch_predict(self, coeffs):
        return self._to_metric(super().torch_predict(coeffs))

    def predict(self, coeffs, return_std=False):
        def std(x):  # delta method: d exp(m) = exp(m) dm
            log_std = self.gp.posterior(x).variance.clamp_min(0).sqrt()
            return torch.where(self.log_mask, torch.exp(super(LogOutputGP, self).torch_predict(x)) * log_std, log_std)

        return gp_model.predict_in_chunks(self.torch_predict, std, coeffs, return_std)

    def mc_objective(self, senses):
        from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective

        sign = torch.tensor([1.0 if s == "max" else -1.0 for s in senses], dtype=torch.float64)
        return GenericMCMultiOutputObjective(lambda samples, X=None: self._to_metric(samples) * sign)


def parego(model, metrics, senses, bounds, q=1, pending=None, seed=0, baseline=None):
    """qLogNParEGO: expected improvement of a random Chebyshev scalarisation per proposal
    (botorch; its weights drawn from a seeded generator), over the evaluated points."""
    from botorch.acquisition.multi_objective.parego import qLogNParEGO
    from botorch.optim import optimize_acqf
    from botorch.utils.sampling import sample_simplex

    box = torch.tensor([[bounds[0]] * model.num_coeffs, [bounds[1]] * model.num_coeffs], dtype=torch.float64)
    first = model.gp.models[0]
    baseline = first.input_transform.untransform(first.train_inputs[0])  # the evaluated points, in the box
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        weights = sample_simplex(len(senses), dtype=torch.float64).reshape(-1)
        acq = qLogNParEGO(model=model.gp, X_baseline=baseline, scalarization_weights=weights, objective=model.mc_objective(senses),
                          prune_baseline=True, X_pending=torch.tensor(pending, dtype=torch.float64) if pending is not None and len(pending) else None)
        candidates, _ = optimize_acqf(acq, bounds=box, q=int(q), num_restarts=6, raw_samples=512, sequential=True)
    return candidates.detach().numpy().clip(bounds[0], bounds[1])


@contextlib.contextmanager
def swapped(module, name, value):
    """Replace ``module.name`` for the duration (a variant that is not shipped)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


_PROPOSE_EHVI = acquisition.propose_ehvi


def observed_front(*args, baseline=None, **kwargs):
    """:func:`~map_merge.acquisition.propose_ehvi` without the evaluated coefficients: qLogEHVI over
    the observed front, whatever the number of metrics."""
    return _PROPOSE_EHVI(*args, **kwargs)


def run_variant(variant: str, objective, num: int, budget: int, seed: int, merge: bool):
    """The variant's ``MAPResult`` (picks from ``result.select``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "quadratic mean":
            return mm.BayesianMAP(budget=budget, acquisition="ehvi", seed=seed).fit(objective, num)
        options = {"experts first": {"design": "sobol"}, "no experts": {"design": "qmc"}, "initial 4": {"initial": 4},
                   "initial 10": {"initial": 10}, "fixed noise": {"noise": "fixed"}, "final picks": {"final": num + 1}, "no ends": {"final": 0},
                   "auto proposals": {"proposal_model": "auto"}, "gp proposals": {"proposal_model": "gp"},
                   **{swap: {"proposal_model": "gp"} for swap in ("quadratic kernel", "multi-output", "log outputs")}}.get(variant, {})
        if variant in ("gp proposals", "quadratic kernel", "multi-output", "log outputs") and proposal_model_for(None, num) != "gp":
            options = {**options, "final": 0}  # like the default there: no picks for the ends (the GPs alone would add them)
        if variant == "previous default":
            options = {"final": 0, "proposal_model": "gp"}  # the ends and cross-validated proposals from T = 4 came later
        if variant in ("experts first", "no experts") and options["design"] == ("sobol" if merge else "qmc"):
            return None  # the default already
        if variant in ("auto proposals", "gp proposals") and options["proposal_model"] == proposal_model_for(None, num):
            return None  # the default already
        if variant == "no ends" and proposal_model_for(None, num) != "gp":
            return None  # the default already: no picks for the ends under cross-validated proposals
        observed, no_average = (acquisition, "propose_ehvi", observed_front), (adaptive, "AVERAGE_MERGE_TASKS", frozenset())
        swaps = {"quadratic kernel": [(gp_model, "GPModel", QuadraticKernelGP)], "multi-output": [(gp_model, "GPModel", MultiOutputGP)],
                 "log outputs": [(gp_model, "GPModel", LogOutputGP)], "qNParEGO": [(acquisition, "propose_ehvi", parego)],
                 "more restarts": [(acquisition, "RESTARTS", 20), (acquisition, "_effort", lambda m: (1024, 128))],
                 "observed front": [observed], "no average": [no_average], "previous default": [observed, no_average],
                 "average at every T": [(adaptive, "AVERAGE_MERGE_TASKS", range(2, 1000))]}
        with contextlib.ExitStack() as stack:
            for swap in swaps.get(variant, []):
                stack.enter_context(swapped(*swap))
            return mm.MAP(budget=budget, seed=seed, **options).fit(objective, num)


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--problem", choices=["analytic", "vision", "lm"], default="analytic")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "qNParEGO"), help=f"from {VARIANTS}")
    p.add_argument("--store", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, num, problem = Path(args.out), args.tasks, args.problem
    if problem == "analytic":
        objective = test_objective = analytic(num)
        names = list(objective.task_names)
    else:
        from map_merge.zoo import load_zoo

        names = TASKS[problem][:num]
        extra = {"size": "tiny" if args.quick else "small"} if problem == "lm" else {}
        zoo = load_zoo(problem, TASKS[problem], progress=False, **extra)
        store = mm.EvaluationStore(args.store or out / f"{problem}{'_loss' if problem == 'lm' else ''}_evals.sqlite")
        objective = zoo.objective(names, split="val", store=store, progress=False)
        test_objective = zoo.objective(names, split="test", store=store, progress=False)
    merge = getattr(objective, "task_vectors", None) is not None
    senses = objective.senses
    budget = args.budget or (10 if args.quick else BUDGET[num])
    grid = mm.grid_design(num, 5 if args.quick else GRID[problem][num])
    val = orient(objective(grid), senses)
    front = val[pareto_mask(val)]
    nadir = front.min(axis=0) - 0.01 * np.maximum(np.ptp(front, axis=0), 1e-12)
    full = mm.hypervolume(front, nadir)
    prefs = test_preferences(num)
    best = (orient(test_objective(grid), senses) @ prefs.T).max(axis=0)

    def regret(coeffs):
        return float(np.mean(best - np.einsum("pm,pm->p", orient(np.asarray(test_objective(coeffs)), senses), prefs)))

    variants = [v for v in args.variants.split(",") if v]
    seeds = list(range(1 if args.quick else args.seeds))
    rows, defaults = [], {}
    journal = RunJournal(out, f"adaptive_levers_{problem}_T{num}", {"runs": [problem, names, budget, len(grid), prefs.tolist(), best.tolist()]})
    if journal.note:
        print(journal.note, flush=True)
    for variant, seed in tqdm([(v, s) for v in variants for s in seeds], desc=f"{problem} T={num} levers"):
        if journal.get(f"{variant}|{seed}") is not None:  # finished before a stop: read back, not run again
            rows.append(journal.get(f"{variant}|{seed}"))
            continue
        if variant == "quadratic+gp picks":
            if ("default", seed) not in defaults:
                defaults[("default", seed)] = run_variant("default", objective, num, budget, seed, merge)
            base = defaults[("default", seed)]
            refit = mm.MAP(sampling="design", model="quadratic+gp", seed=seed).fit_samples(base.samples, objective=objective, task_names=names)
            rows.append({"variant": variant, "seed": seed, "hv_ratio": mm.hypervolume(orient(base.samples.metrics, senses), nadir) / full,
                         "pick_regret": regret(np.stack([refit.select(w) for w in prefs])),
                         "noisy": list(check_noisy(refit.noisy, num)), "noisy_trend": refit.fitter.noisy_trend})
            journal.add(f"{variant}|{seed}", rows[-1])
            continue
        start = time.perf_counter()
        result = defaults.get((variant, seed)) or run_variant(variant, objective, num, budget, seed, merge)
        if result is None:
            continue
        if variant == "default":
            defaults[(variant, seed)] = result
        proposals = result.settings.get("proposal_seconds") or []
        rows.append({"variant": variant, "seed": seed, "evaluations": len(result.samples), "seconds": time.perf_counter() - start,
                     "proposal_model": result.settings.get("proposal_model"),
                     "hv_ratio": mm.hypervolume(orient(result.samples.metrics, senses), nadir) / full,
                     "pick_regret": regret(np.stack([result.select(w) for w in prefs])),
                     "noisy": list(check_noisy(result.noisy, num)), "noisy_trend": result.fitter.noisy_trend,
                     **({"propose_median_s": float(np.median(proposals))} if proposals else {})})
        journal.add(f"{variant}|{seed}", rows[-1])
    summary = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sub = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "seeds": len(sub)}
        for key in ("hv_ratio", "pick_regret", "propose_median_s"):
            values = [r[key] for r in sub if key in r]
            if values:
                entry[f"{key}_mean"], entry[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
        summary.append(entry)
    name = f"adaptive_levers_{problem}_T{num}"
    path = write(out, name, {"problem": problem, "tasks": num, "task_names": names, "budget": budget, "seeds": len(seeds), "merge": merge,
                             "grid_points": len(grid), "test_preferences": prefs.tolist(), "rows": rows, "summary": summary})
    journal.close()
    title = f"MAP's levers, {problem} T={num}, {budget} real evaluations, {len(seeds)} seeds"
    plots.plot_bars({s["variant"]: (s["hv_ratio_mean"], s["hv_ratio_std"]) for s in summary}, "hypervolume ratio to the grid's front (higher is better)",
                    title=title, path=out / f"{name}.png")
    plots.plot_bars({s["variant"]: (s["pick_regret_mean"], s["pick_regret_std"]) for s in summary}, "test regret of the picks (lower is better)",
                    title=title, path=out / f"{name}_regret.png")
    print(table(summary, ["variant", "seeds", "hv_ratio_mean", "hv_ratio_std", "pick_regret_mean", "pick_regret_std", "propose_median_s_mean"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
