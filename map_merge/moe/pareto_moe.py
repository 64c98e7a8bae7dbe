"""PWE-MoE: the whole Pareto set of merged models in one preference-routed model.

Chosen modules ("upcycled") become weight-ensembling mixtures whose experts are that module's
task vectors: for a preference ``r`` on the simplex, the module's weights are
``theta_0 + sum_i w_i(r) tau_i`` with ``w = router(r)`` (no softmax, no clamping). Everything else is
merged once by task arithmetic with ``init_lambda``. One router per upcycled module:
``Linear(T, 2T) -> ReLU -> Linear(2T, T)``, weights ``N(0, 0.01^2)``, first bias 0, last bias
``init_lambda`` (so the model starts as task arithmetic with ``init_lambda``); ``4T^2 + 3T``
trainable parameters per router.

The model runs through ``torch.func.functional_call`` with the upcycled parameters replaced by
merged tensors computed from the current routers at every forward (so weights are never stale
after an optimizer step). :meth:`ParetoMoE.unload` returns a dense model of the original
architecture for one preference, with the same outputs and the original inference cost.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..pareto import check_preference
from ..task_vectors import TaskVectors
from .epo import epo_weights

__all__ = ["ParetoMoE", "Router", "find_mlp_groups", "FitHistory"]

log = logging.getLogger(__name__)

#: default router-training steps: where the unloaded fronts' hypervolume stops rising on the
#: vision zoo (``benchmarks/bench_moe_convergence.py``: 0.60-0.64 at 2000 steps, 0.61-0.63 at 4000)
ROUTER_STEPS = 2000
#: default share of router-training steps whose preference is a corner of the simplex: 0, the
#: paper's Dirichlet(1) draws. Corner draws (0.25, 0.5) did not bring the corner models closer to
#: the fine-tuned ones on the vision zoo and cost interior accuracy on an analytic problem
#: (``benchmarks/bench_moe_convergence.py``, docs/moe.md "PWE-MoE trained to its plateau").
CORNERS = 0.0


class Router(nn.Module):
    """``Linear(T, 2T) -> ReLU -> Linear(2T, T)``: preference ``(T,)`` to expert weights ``(T,)``."""

    def __init__(self, num_tasks: int, init_lambda: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_tasks, 2 * num_tasks)
        self.fc2 = nn.Linear(2 * num_tasks, num_tasks)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.normal_(0.0, 0.01, generator=generator)
            self.fc1.bias.zero_()
            self.fc2.bias.fill_(init_lambda)

    def forward(self, preference: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(preference)))


_MLP_PATTERNS = [
    # BERT-like encoders: the MLP is split over intermediate.dense and output.dense
    (re.compile(r"^(?P<group>(?:.*\.)?layer\.\d+)\.(?:intermediate\.dense|output\.dense)$"), "bert"),
    # GPT-2 blocks: h.N.mlp (c_fc, c_proj); CLIP / ViT: *.mlp (fc1, fc2)
    (re.compile(r"^(?P<group>(?:.*\.)?(?:h|layers|layer|blocks)\.\d+\.mlp)\.[^.]+$"), "mlp"),
]


def find_mlp_groups(model: nn.Module) -> dict[str, list[str]]:
    """``group -> module names`` of each transformer block's MLP for BERT-like, GPT-2 and CLIP/ViT
    models (one router per group). Empty if none is recognised."""
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        for pattern, _ in _MLP_PATTERNS:
            match = pattern.match(name)
            if match:
                groups.setdefault(match.group("group") + ".mlp" if not match.group("group").endswith("mlp") else match.group("group"), []).append(name)
                break
    return groups


def _pattern_groups(model: nn.Module, pattern: str) -> dict[str, list[str]]:
    regex = re.compile(pattern)
    return {name: [name] for name, module in model.named_modules() if regex.search(name) and any(True for _ in module.parameters(recurse=False))}


@dataclass
class FitHistory:
    """Per step: preference, task losses, total loss, and whether the EPO LP succeeded."""

    preferences: list[list[float]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    lp_ok: list[bool] = field(default_factory=list)
    seconds: float = 0.0


class ParetoMoE(nn.Module):
    """Preference-routed weight-ensembling MoE over task vectors.

    Args:
        pretrained: the pretrained model (its architecture is kept; it is copied, not modified).
        task_vectors: the tasks' :class:`TaskVectors` over ``pretrained``'s state dict, or the
            fine-tuned models themselves (a sequence or a ``name -> model`` mapping, anything
            :meth:`TaskVectors.from_models` takes).
        upcycle: ``"mlp"`` (each transformer block's MLP, found automatically), ``"all"`` (every
            module with parameters) or a regular expression over module names.
        init_lambda: task-arithmetic scale of everything else, and the routers' initial output.
        seed: seeds the routers' initial weights.
    """

    def __init__(self, pretrained: nn.Module, task_vectors: TaskVectors | Sequence | Mapping, upcycle: str = "mlp",
                 init_lambda: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(task_vectors, TaskVectors):
            task_vectors = TaskVectors.from_models(pretrained, task_vectors)
        self.num_tasks = task_vectors.num_tasks
        self.task_names = task_vectors.names
        self.init_lambda = float(init_lambda)
        model = copy.deepcopy(pretrained)
        if upcycle == "mlp":
            groups = find_mlp_groups(model)
            if not groups:
                raise ValueError(
                    f"no transformer MLP blocks recognised in {type(model).__name__}; pass upcycle='all' or a module-name pattern"
                )
        elif upcycle == "all":
            groups = {name: [name] for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))}
        else:
            groups = _pattern_groups(model, upcycle)
            if not groups:
                raise ValueError(f"upcycle pattern {upcycle!r} matches no module with parameters in {type(model).__name__}")
        # everything merged by task arithmetic with init_lambda first
        task_vectors.merge_into(model, [self.init_lambda] * self.num_tasks)
        model = copy.deepcopy(model)  # detach the model from the task vectors' shared buffer
        state = model.state_dict(keep_vars=True)
        self.groups: dict[str, list[str]] = {}
        self._bases: dict[str, torch.Tensor] = {}
        self._experts: dict[str, torch.Tensor] = {}
        wanted = {group: [f"{m}.{p}" if m else p for m in modules for p, _ in model.get_submodule(m).named_parameters(recurse=False)]
                  for group, modules in groups.items()}
        # the experts of each live parameter, through the key map (renamed, tied and fused tensors)
        found = task_vectors.live_deltas(model, [k for keys in wanted.values() for k in keys])
        for group, keys in wanted.items():
            keys = [k for k in keys if k in found]
            if not keys:
                continue
            self.groups[group] = keys
            for key in keys:
                base, experts = found[key]
                self._bases[key] = base.clone()
                self._experts[key] = experts.clone()
                state[key].requires_grad_(False)
        if not self.groups:
            raise ValueError(f"none of the upcycled modules ({sorted(groups)[:5]}) holds a parameter of the task vectors")
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        self.routers = nn.ModuleDict({_safe(g): Router(self.num_tasks, self.init_lambda, generator) for g in self.groups})
        device = task_vectors.device
        self.routers.to(device=device, dtype=task_vectors.dtype)
        self.register_buffer("preference", torch.full((self.num_tasks,), 1.0 / self.num_tasks, device=device, dtype=task_vectors.dtype))

    # ------------------------------------------------------------------ preference and weights
    def _check_preference(self, preference) -> torch.Tensor:
        r = check_preference(np.asarray(torch.as_tensor(preference).detach().cpu(), dtype=np.float64), self.num_tasks)
        return torch.tensor(r, dtype=self.preference.dtype, device=self.preference.device)

    def set_preference(self, preference: Sequence[float] | torch.Tensor) -> "ParetoMoE":
        """Route by ``preference: (T,)`` (normalised to sum 1) from now on."""
        self.preference.copy_(self._check_preference(preference))
        return self

    def coefficients(self, preference: Sequence[float] | torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """``group -> (T,)`` expert weights of each upcycled module for a preference."""
        r = self.preference if preference is None else self._check_preference(preference)
        with torch.no_grad():
            return {g: self.routers[_safe(g)](r).double().cpu().numpy() for g in self.groups}

    def merged_parameters(self, preference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Merged tensors of all upcycled parameters for a preference (differentiable in the routers)."""
        r = self.preference if preference is None else preference
        out = {}
        for group, keys in self.groups.items():
            weights = self.routers[_safe(group)](r)
            for key in keys:
                experts = self._experts[key]
                out[key] = self._bases[key] + torch.tensordot(weights, experts, dims=([0], [0]))
        return out

    @property
    def num_trainable(self) -> int:
        """Trainable (router) parameters: ``(4T^2 + 3T)`` per upcycled module."""
        return sum(p.numel() for p in self.routers.parameters())

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.merged_parameters(), args, kwargs, strict=False, tie_weights=True)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._bases = {k: fn(v) for k, v in self._bases.items()}
        self._experts = {k: fn(v) for k, v in self._experts.items()}
        return self

    # ------------------------------------------------------------------ unload
    def unload(self, preference: Sequence[float] | torch.Tensor) -> nn.Module:
        """A dense model of the original architecture holding the merged weights for ``preference``."""
        r = self._check_preference(preference)
        dense = copy.deepcopy(self.model)
        with torch.no_grad():
            merged = self.merged_parameters(r)
            state = dense.state_dict(keep_vars=True)
            for key, value in merged.items():
                state[key].copy_(value)
        for param in dense.parameters():
            param.requires_grad_(True)
        return dense.eval()

    def objective(
        self,
        tasks: Mapping[str, Callable[[nn.Module], float]],
        senses: Sequence[str] | None = None,
        key: str = "",
        store=None,
        progress: bool = False,
        noisy: Sequence[bool] | None = None,
    ):
        """An objective over *preference vectors* ``(K, T)``: the scores ``(K, M)`` of the dense
        models :meth:`unload` ``(r)``, one column per entry of ``tasks`` (``score(model) -> float``);
        ``noisy``: per score, whether it is a noisy estimate (an accuracy on a few hundred examples),
        as the objective's ``noisy`` (default: none is).

        Stored results (``store``) are keyed by the routers' weights and ``key``, which should name
        the scoring (data, metric): retrained routers or another scoring never reuse old scores."""
        import hashlib
        import json

        from ..objective import FunctionObjective

        names = list(tasks)
        if not names:
            raise ValueError("tasks must name at least one score(model) -> float")

        def evaluate(preference: np.ndarray) -> np.ndarray:
            dense = self.unload(preference)
            with torch.inference_mode():
                return np.array([float(tasks[n](dense)) for n in names])

        hasher = hashlib.blake2b(digest_size=8)
        for param in self.routers.parameters():
            hasher.update(param.detach().cpu().numpy().tobytes())
        full_key = json.dumps({"pwe-moe": hasher.hexdigest(), "scoring": key})
        return FunctionObjective(evaluate, self.num_tasks, names, senses=senses, batched=False, key=full_key, store=store, progress=progress,
                                 noisy=noisy)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        task_losses: Mapping[str, Callable[[nn.Module], torch.Tensor]],
        steps: int = ROUTER_STEPS,
        method: str = "ls",
        lr: float = 1e-2,
        alpha: float = 1.0,
        corners: float = CORNERS,
        seed: int = 0,
        progress: bool = True,
        callback: Callable[[int], None] | None = None,
    ) -> FitHistory:
        """Train the routers only.

        Each step draws a preference ``r``: with probability ``corners`` a corner of the simplex
        (one task, uniformly), else ``r ~ Dirichlet(alpha)``; routes by it, computes each task's
        loss with ``task_losses[name](self)`` (which draws its own batch) and minimises
        ``sum_i r_i L_i`` (``method="ls"``) or the EPO-weighted ``sum_i T alpha_i L_i``
        (``method="epo"``). Adam, cosine schedule from ``lr`` to ``lr / 10``. Dirichlet draws
        rarely come near the corners at ``T >= 3``; ``corners > 0`` adds corner draws (measured in
        ``benchmarks/bench_moe_convergence.py``: no closer corners, so the default is 0).
        ``callback(step)`` is called after every optimizer step (``step`` from 1), e.g. to score
        the unloaded models along the way.
        """
        import time

        from tqdm.auto import tqdm

        if method not in ("ls", "epo"):
            raise ValueError(f"method must be 'ls' (linear scalarisation) or 'epo', got {method!r}")
        names = list(task_losses)
        if names != list(self.task_names):
            raise ValueError(f"task_losses must be given for the tasks {list(self.task_names)} in that order, got {names}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not 0.0 <= corners <= 1.0:
            raise ValueError(f"corners is the share of steps with a one-task preference, in [0, 1]; got {corners}")
        params = list(self.routers.parameters())
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 10)
        rng = np.random.default_rng(seed)
        history = FitHistory()
        start = time.perf_counter()
        self.eval()  # only the routers train; dropout in the wrapped model stays off
        with tqdm(range(steps), desc=f"training routers ({method})", disable=not progress, leave=False) as bar:
            for step in bar:
                if corners > 0 and rng.random() < corners:
                    r = np.eye(self.num_tasks)[rng.integers(self.num_tasks)]
                else:
                    r = rng.dirichlet(np.full(self.num_tasks, alpha))
                self.set_preference(r)
                losses = [_check_loss(task_losses[n](self), n) for n in names]
                stacked = torch.stack(losses)
                ok = True
                if method == "ls":
                    weights = torch.tensor(r, dtype=stacked.dtype, device=stacked.device)
                else:
                    grads = []
                    for loss in losses:
                        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)]))
                    weights_np, ok = epo_weights(torch.stack(grads).double().cpu().numpy(), stacked.detach().double().cpu().numpy(), r)
                    weights = self.num_tasks * torch.tensor(weights_np, dtype=stacked.dtype, device=stacked.device)
                total = (weights.detach() * stacked).sum()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                schedule.step()
                history.preferences.append(r.tolist())
                history.losses.append(stacked.detach().cpu().tolist())
                history.total.append(float(total.detach()))
                history.lp_ok.append(ok)
                bar.set_postfix(loss=f"{history.total[-1]:.3f}")
                if callback is not None:
                    callback(step + 1)
        self.eval()
        history.seconds = time.perf_counter() - start
        return history

    def fit_or_load(self, task_losses: Mapping[str, Callable[[nn.Module], torch.Tensor]], path=None, **fit_options) -> dict:
        """:meth:`fit`, unless ``path`` (a ``.pt`` file named by the caller for every setting of the
        run) holds routers trained before: then load them. Trained routers are saved to ``path``.

        Returns ``info``: method, steps, seconds, trainable parameters, routers, the EPO LP success
        rate, the final loss, the process's peak RSS and ``cached`` (loaded, not trained)."""
        import resource
        from pathlib import Path

        path = Path(path) if path is not None else None
        if path is not None and path.exists():
            try:  # never unpickle arbitrary objects from a file: tensors and plain values only
                saved = torch.load(path, weights_only=True)
            except Exception as error:  # noqa: BLE001 - an unreadable or unsafe checkpoint is retrained, not trusted
                log.warning("router checkpoint %s cannot be loaded safely (%s); training again", path, error)
            else:
                self.routers.load_state_dict(saved["routers"])
                return {**saved["info"], "cached": True}
        history = self.fit(task_losses, **fit_options)
        info = {"method": fit_options.get("method", "ls"), "steps": len(history.total), "seconds": history.seconds,
                "trainable_params": self.num_trainable, "routers": len(self.routers),
                "lp_success_rate": float(np.mean(history.lp_ok)) if history.lp_ok else float("nan"),
                "final_loss": float(np.mean(history.total[-10:])),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # renamed into place: readers see all or nothing
            try:
                torch.save({"routers": self.routers.state_dict(), "info": info}, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return {**info, "cached": False}


def _check_loss(loss: object, task: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"the training loss of task {task!r} must be a scalar torch.Tensor, got "
                         f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise ValueError(f"the training loss of task {task!r} does not depend on the routers: compute it from the output of "
                         "the model it is given (model(inputs)), outside torch.no_grad()")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"the training loss of task {task!r} is {float(loss.detach())}")
    return loss.reshape(())


def _safe(name: str) -> str:
    return name.replace(".", "__") or "_root"  # a ModuleDict key: no dots, not empty (the root module)


def simplex_lattice(num_tasks: int, step: float = 0.1) -> np.ndarray:
    """Preference vectors on the simplex with coordinates in multiples of ``step``."""
    from ..search import _simplex_lattice

    return _simplex_lattice(num_tasks, int(round(1.0 / step)))
