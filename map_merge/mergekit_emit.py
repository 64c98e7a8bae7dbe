"""mergekit recipes out: :func:`emit_recipe` writes the config with which ``mergekit-yaml``
reproduces a merge of task vectors, :func:`recipe_yaml` its file's text. How our operators map
onto mergekit's methods, and what has no exact counterpart (a :class:`~map_merge.errors.RecipeError`
here), is in :mod:`map_merge.mergekit_config`, which reads recipes and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import RecipeError
from .groups import Groups
from .merge_methods import Breadcrumbs, Della, MergeMethod, TaskArithmetic, Ties
from .mergekit_weights import names_field, weight_setting

__all__ = ["emit_recipe", "recipe_yaml", "EMIT_METHODS", "LORA_NOTE"]

EMIT_METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")


def emit_recipe(base_model: str, models: Mapping[str, str], coeffs: np.ndarray, method: MergeMethod | None = None,
                groups: Groups | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The mergekit config reproducing ``theta_0 + sum_i c_i V'_i`` for ``coeffs: (T, G)``.

    ``models``: task name -> path (an adapter folder is written ``base+adapter``). Raises
    RecipeError when mergekit has no exact counterpart (see the module docstring)."""
    method = method or TaskArithmetic()
    matrix = np.asarray(coeffs, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.shape[0] != len(models):
        raise RecipeError(f"{matrix.shape[0]} coefficient rows for {len(models)} models")
    params: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    name = method.name
    if isinstance(method, TaskArithmetic):
        merge_method, consensus = "task_arithmetic", False
        params["normalize"] = False
    elif isinstance(method, Ties):
        merge_method, consensus = "ties", True
        _check_tensor_scope(method)
        per_model["density"] = float(method.k)
    elif isinstance(method, Breadcrumbs):
        _check_tensor_scope(method)
        consensus = method.consensus is not None
        merge_method = "breadcrumbs_ties" if consensus else "breadcrumbs"
        per_model.update(density=float(method.density), gamma=float(method.gamma))
        params["rescale"] = method.rescale == "l1"
        params["normalize"] = bool(method.normalize)
        if method.rescale not in (None, "l1"):
            raise RecipeError(f"Breadcrumbs rescale={method.rescale!r} has no mergekit counterpart")
    elif isinstance(method, Della):
        _check_tensor_scope(method)
        consensus = method.consensus is not None
        merge_method = "della" if consensus else "della_linear"
        if method.rescale not in (None, "l1"):
            raise RecipeError(f"Della rescale={method.rescale!r} has no mergekit counterpart (mergekit rescales by an L1 norm match)")
        per_model.update(density=float(method.density), epsilon=float(method.epsilon))
        params["rescale"] = method.rescale == "l1"
        params["normalize"] = bool(method.normalize)
    else:
        raise RecipeError(f"merge method {name!r} cannot be written for mergekit (its random masks and rescaling differ); "
                          f"map_merge writes {list(EMIT_METHODS)}")
    if consensus:
        if groups is not None and groups.size > 1 or not np.allclose(matrix, matrix.flat[0]):
            raise RecipeError(f"{merge_method} with unequal coefficients (or groups) has no exact mergekit counterpart: mergekit "
                              "weights the deltas before the sign election; use task_arithmetic, breadcrumbs or della_linear, or "
                              "save_merged for the exact merge")
        params["normalize"] = bool(getattr(method, "normalize", True))  # Ties: the disjoint mean
        params["lambda"] = float(matrix.flat[0])
        weights = {n: 1.0 for n in models}
    else:
        try:
            weights = {n: weight_setting(row, groups) for n, row in zip(models, matrix)}
        except ValueError as error:
            raise RecipeError(str(error)) from None
    entries = []
    for task, path in models.items():
        entries.append({"model": path, "parameters": {"weight": weights[task], **per_model}})
    out: dict[str, Any] = {"merge_method": merge_method, "base_model": base_model, "models": entries, "dtype": dtype}
    if params:
        out["parameters"] = params
    named = None if consensus else names_field(groups, weights.values())
    if named is not None:
        out["map_merge"] = named  # mergekit ignores it; read back, the groups keep their names
    return out


def _check_tensor_scope(method: MergeMethod) -> None:
    if getattr(method, "scope", "tensor") != "tensor":
        raise RecipeError(f"{type(method).__name__}(scope={getattr(method, 'scope')!r}) trims over the whole model; mergekit trims per "
                          "tensor: use scope='tensor' for a mergekit recipe")


LORA_NOTE = """\
# This recipe merges LoRA adapters (model: base+adapter). Run it with a cache folder for the merged
# adapters:  mergekit-yaml THIS.yaml OUT --lora-merge-cache DIR --lora-merge-dtype float32
# mergekit first merges each adapter into a copy of the base model in DIR, by default in the base
# checkpoint's dtype (e.g. bfloat16, which rounds base + adapter); float32 merges as map_merge does.
"""


def recipe_yaml(config: Mapping[str, Any]) -> str:
    """``config`` (from :func:`emit_recipe`) as the YAML text of a file for ``mergekit-yaml``: with
    a LoRA source (``base+adapter``), a comment at the top says the flags mergekit needs for it."""
    import yaml

    text = yaml.safe_dump(dict(config), sort_keys=False)
    models = config.get("models") or []
    lora = any(isinstance(m, Mapping) and "+" in str(m.get("model", "")) for m in models)
    return LORA_NOTE + text if lora else text
