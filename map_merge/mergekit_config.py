"""mergekit recipes in and out, on plain data (no weights are read here; filtered weights only look
up the base checkpoint's tensor names, in its safetensors headers, to drop groups that own none).

:func:`parse_recipe` turns a mergekit config (the YAML users give ``mergekit-yaml``: ``models``,
``base_model``, ``merge_method``, ``parameters``, ``dtype``) into a :class:`MergekitRecipe`: the model
paths, our operator, the coefficient groups and the recipe's coefficients (the starting point of
a search). :func:`emit_recipe` (:mod:`map_merge.mergekit_emit`, re-exported here) writes the config
with which ``mergekit-yaml`` reproduces a merge.

How mergekit's generalized task arithmetic maps onto ``theta_0 + sum_i c_i V'_i`` (mergekit 0.1.5):

- ``task_arithmetic`` (and ``breadcrumbs``, ``della_linear``: no sign consensus): the merged delta
  is ``lambda * sum_i w_i V'_i`` (``/ sum_i w_i`` with ``normalize: true``), so ``c_i = lambda w_i``
  (``/ sum w``). Exact both ways, per tensor, also for per-layer weight lists and filtered weights;
  except ``normalize: true`` over per-layer lists whose sum over the models varies with depth:
  mergekit divides the interpolated weights per layer, which no knot interpolation reproduces (the
  knots are then normalised one by one, and the recipe's ``notes`` say so).
- ``ties``, ``breadcrumbs_ties``, ``della`` (sign consensus; ``normalize`` divides by the agreeing
  weights): with every weight equal, the merged delta is ``lambda`` times the mean (or, without
  ``normalize``, the sum) of the agreeing pruned deltas, which is our operator (with the same
  ``normalize``) at every ``c_i = lambda`` (emitted as ``weight: 1, lambda: c``). mergekit
  weights the deltas before the sign election, so unequal weights have no exact counterpart: read,
  they give the starting point ``c_i = lambda w_i / mean(w)``; a merge with unequal coefficients is
  not emitted for these methods.
- ``linear``: a weighted average of every listed model (the base too, when it is listed with a
  weight): ``theta_0 + sum_i (w_i / sum_j w_j) tau_i``; with ``normalize: false`` only when the
  weights sum to 1 (otherwise the base itself is scaled). ``lambda`` is not a ``linear`` setting.
- ``ties`` with ``normalize: false`` sums the agreeing trimmed deltas: read as
  ``Breadcrumbs(density, gamma=0, consensus="sum", normalize=False)``, the same trim.
- ``dare_linear`` / ``dare_ties`` are read (``Dare(p = 1 - density)``) but never emitted: mergekit
  rescales DARE by an L1 norm match and draws other masks, so no config reproduces our merge.

Weights may be numbers (numeric strings such as ``'1e-1'`` too), per-layer lists (a gradient:
:meth:`~map_merge.Groups.by_depth` with as many knots; non-layer tensors take the first, as in
mergekit) or lists of ``{filter, value}`` conditions (substring filters, first match wins: regex
:class:`~map_merge.Groups` of the escaped filters, the unfiltered entry the catch-all ``rest``)
whose values may be gradients; models may mix these forms, and filters none of a model's conditions
matches take the top-level ``weight`` (:mod:`map_merge.mergekit_weights`). Models whose filters
differ give the cells of the joint partition as groups (:mod:`map_merge.mergekit_filters`).
Top-level fields mergekit does not know are ignored, as mergekit ignores them, with a warning; but
for ``map_merge``, the names of the groups of a recipe written here (:func:`~map_merge.mergekit_weights.named_groups`). ``normalize``,
``rescale``, ``int8_mask`` are read as pydantic reads a ``bool`` (``"false"``, ``no``, ``0``: false;
:func:`~map_merge.numeric.parse_bool`), numbers as its ``float`` (``true``: 1.0).

A written recipe with a LoRA source (``base+adapter``) needs ``mergekit-yaml --lora-merge-cache
DIR``: mergekit first merges each adapter into a copy of the base (in the base checkpoint's dtype,
transformers' ``dtype="auto"``, unless ``--lora-merge-dtype`` says otherwise); :func:`recipe_yaml`
says so in a comment at the top of the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .deprecation import renamed
from .errors import RecipeError
from .groups import Groups
from .merge_methods import MergeMethod
from .mergekit_emit import EMIT_METHODS, LORA_NOTE, emit_recipe, recipe_yaml
from .mergekit_filters import checkpoint_tensor_names, drop_unused
from .mergekit_methods import operator_for
from .mergekit_settings import read_settings, tokenizer_notes
from .mergekit_weights import named_groups, per_knot_normalising_is_inexact, read_weights
from .numeric import parse_bool, parse_number

__all__ = ["MergekitRecipe", "RecipeError", "from_mergekit", "parse_recipe", "emit_recipe", "recipe_yaml", "read_recipe",
           "READ_METHODS", "EMIT_METHODS", "LORA_NOTE"]

log = logging.getLogger(__name__)

READ_METHODS = ("task_arithmetic", "linear", "ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "dare_linear", "dare_ties")
_CONSENSUS = ("ties", "breadcrumbs_ties", "della", "dare_ties")
_NORMALIZE_DEFAULT = {"task_arithmetic": False, "linear": True, "ties": True, "breadcrumbs": False, "breadcrumbs_ties": False,
                      "della": True, "della_linear": False, "dare_linear": False, "dare_ties": False}
_FLAGS = ("int8_mask", "normalize", "rescale")  # mergekit's true/false settings of the task arithmetic family; linear: normalize
_TOP_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "tokenizer_source", "tokenizer", "chat_template",
             "out_dtype", "name", "map_merge"}


@dataclass
class MergekitRecipe:
    """A mergekit recipe as task arithmetic (what :func:`from_mergekit` returns; not
    :class:`map_merge.Recipe`, the job an executor runs).

    Attributes:
        base_model: the pretrained model's path.  models: ``task name -> model path`` (an adapter
            on the base is ``base+adapter`` in mergekit; here its adapter folder).
        method: the operator.  groups: coefficient groups (``None``: one coefficient per task).
        coeffs: ``(T, G)`` the recipe's coefficients.  dtype: the recipe's ``dtype``.
        settings: the recipe's ``dtype``, ``out_dtype``, ``tokenizer_source``, ``tokenizer``,
            ``chat_template`` as read (those set): kept in a recipe a run from it emits
            (:mod:`map_merge.mergekit_settings`; map_merge's saved folder keeps the pretrained
            checkpoint's dtypes and tokenizer, and says so in a warning where mergekit's differ).
    """

    base_model: str
    models: dict[str, str]
    method: MergeMethod
    groups: Groups | None
    coeffs: np.ndarray
    merge_method: str = "task_arithmetic"
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def flat_coeffs(self) -> np.ndarray:
        """``(T * G,)`` task-major: the starting point of a search."""
        return self.coeffs.reshape(-1)

    def coeffs_for(self, names: Sequence[str]) -> np.ndarray:
        """``(len(names) * G,)`` task-major coefficients of the tasks ``names`` in that order (task
        vectors built in another order than the recipe's, or of a subset of its models)."""
        order = list(self.models)
        unknown = [n for n in names if n not in order]
        if unknown:
            raise RecipeError(f"mergekit recipe has no model named {unknown[0]!r}; its models are {order}")
        return self.coeffs[[order.index(n) for n in names]].reshape(-1)

    def task_vectors(self, **options: Any):
        """``TaskVectors.from_models(base_model, models, **options)`` (streamed for folders)."""
        from .task_vectors import TaskVectors

        return TaskVectors.from_models(self.base_model, dict(self.models), **options)


def _fail(field: str, message: str) -> RecipeError:
    return RecipeError(f"mergekit recipe: field {field!r} {message}")


def _number(value: Any, field: str) -> float:
    try:
        return parse_number(value, bools=True)  # pydantic's float: true is 1.0
    except ValueError as error:
        raise _fail(field, f"must be a number: {error}") from None


def _flags(method_name: str, params: Mapping[str, Any]) -> dict[str, bool]:
    """The recipe's true/false settings that ``method_name`` reads, parsed as mergekit parses them
    (one value for the whole model; mergekit ignores the others, and so does this)."""
    out = {}
    for key in ("normalize",) if method_name == "linear" else _FLAGS:
        if key not in params:
            continue
        value = params[key]
        if isinstance(value, (list, Mapping)):
            raise _fail(key, f"is {value!r}: per-layer or filtered {key} is not supported; give one true or false for the model")
        try:
            out[key] = parse_bool(value)
        except ValueError as error:
            raise _fail(key, f"must be true or false: {error}") from None
    return out


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A mergekit YAML file as a mapping (relative model paths made absolute against its folder)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mergekit recipe {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"mergekit recipe {path}: not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise RecipeError(f"mergekit recipe {path}: expected a mapping of fields, got {type(config).__name__}")
    return _absolute(config, path.parent)


def _absolute(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    def fix(ref: Any) -> Any:
        if not isinstance(ref, str):
            return ref
        parts = [p if Path(p).is_absolute() or not (folder / p).exists() else str((folder / p).resolve()) for p in ref.split("+")]
        return "+".join(parts)

    out = dict(config)
    if "base_model" in out:
        out["base_model"] = fix(out["base_model"])
    if isinstance(out.get("models"), list):
        out["models"] = [({**m, "model": fix(m.get("model"))} if isinstance(m, dict) else m) for m in out["models"]]
    return out


def _task_name(path: str, taken: set[str]) -> str:
    name = Path(path.split("+")[-1].rstrip("/")).name or "model"
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def parse_recipe(config: Mapping[str, Any]) -> MergekitRecipe:
    """A :class:`MergekitRecipe` from a mergekit config mapping (see the module docstring).

    Raises RecipeError naming the field: no, an unknown or an unsupported ``merge_method``,
    ``slices``, ``modules``, no ``models``, a model without ``model``, no ``base_model``, gradients
    of different lengths, a per-model density that differs between models. Fields mergekit ignores
    are named in a warning (and in the recipe's ``notes``)."""
    if not isinstance(config, Mapping):
        raise RecipeError(f"mergekit recipe: expected a mapping, got {type(config).__name__}")
    if "slices" in config:
        raise _fail("slices", "is not supported (layer slicing and stacking is not task arithmetic); use 'models'")
    if "modules" in config:
        raise _fail("modules", "is not supported (per-module merges of multi-module models); use 'models'")
    unknown = sorted(set(config) - _TOP_KEYS)  # mergekit's MergeConfiguration ignores them (pydantic's extra="ignore")
    ignored = [f"fields {unknown} are no mergekit fields: mergekit ignores them, and so does map_merge (a typo?)"] if unknown else []
    method_name = config.get("merge_method")
    if method_name is None:
        raise _fail("merge_method", "is required (mergekit refuses a recipe without it)"
                                    + (f"; the recipe has fields mergekit ignores: {unknown}" if unknown else ""))
    if method_name not in READ_METHODS:
        raise _fail("merge_method", f"is {method_name!r}; map_merge reads {list(READ_METHODS)}")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise _fail("models", "must be a non-empty list of {model: path, parameters: {...}}")
    base = config.get("base_model")
    if not isinstance(base, str) or not base:
        if method_name != "linear":
            raise _fail("base_model", f"is required for {method_name!r} (the pretrained model the task vectors start from)")
        raise _fail("base_model", "is required: map_merge merges task vectors against a pretrained model")
    if "+" in base:
        raise _fail("base_model", f"is {base!r}; a LoRA-on-base reference cannot be the pretrained model")
    global_params = dict(config.get("parameters") or {})
    try:
        settings = read_settings(config)
    except ValueError as error:
        raise RecipeError(f"mergekit recipe: {error}") from None
    flags = _flags(method_name, global_params)
    entries: list[tuple[str, dict[str, Any]]] = []
    names: list[str] = []
    taken: set[str] = set()
    base_weights: list[Any] = []  # linear: the base's weight counts in the average
    listed_base = False
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise _fail(f"models[{i}]", f"must be a mapping with a 'model' path, got {entry!r}")
        path = entry["model"]
        params = {**global_params, **dict(entry.get("parameters") or {})}
        if path == base:  # the base listed among the models carries no task vector
            if method_name == "linear":
                if "weight" not in params:
                    raise _fail(f"models[{i}].parameters.weight", "is required (linear averages every listed model, the base too)")
                base_weights.append(params["weight"])
            listed_base = True
            continue
        if "+" in path:
            stem, adapter = path.split("+", 1)
            if stem != base:
                raise _fail(f"models[{i}].model", f"{path!r} puts an adapter on {stem!r}, not on base_model {base!r}")
            path = adapter
        names.append(_task_name(path, taken))
        taken.add(names[-1])
        if "weight" not in params:
            raise _fail(f"models[{i}].parameters.weight", "is required (the model's coefficient)")
        entries.append((path, params))
    if not entries:
        raise _fail("models", "lists only the base model; no task vector to merge")
    if method_name == "linear" and not listed_base and "weight" in global_params:
        base_weights.append(global_params["weight"])  # mergekit adds the unlisted base, with the shared weight
    try:
        groups, everything = read_weights([p["weight"] for _, p in entries] + base_weights,
                                          [p for p, _ in entries] + [f"the base {base}"] * len(base_weights),
                                          fallback=global_params.get("weight"))
    except ValueError as error:
        raise RecipeError(f"mergekit recipe: {error}") from None
    names_in_base = checkpoint_tensor_names(base) if groups is not None and groups.patterns else None
    notes: list[str] = list(ignored)
    if names_in_base is not None:  # cells no tensor of this model falls into (self_attn&mlp), filters matching nothing
        groups, everything, dropped = drop_unused(groups, everything, names_in_base)
        single = [n for n in dropped if "&" not in n]
        if single:
            notes.append(f"filter group(s) {single} own no tensor of the base model (their filter matches none, or earlier filters "
                         "take all it matches): mergekit never uses them, and they are dropped")
    groups, unnamed = named_groups(groups, config.get("map_merge"))
    notes += [unnamed] if unnamed else []
    matrix = everything[: len(entries)]
    normalize = flags.get("normalize", _NORMALIZE_DEFAULT[method_name])
    lam = 1.0 if method_name == "linear" else _number(global_params.get("lambda", 1.0), "lambda")  # linear has no lambda
    if method_name == "linear" and not listed_base and "weight" not in global_params:
        notes.append("linear with an unlisted base_model and no top-level weight: mergekit-yaml refuses this recipe (it adds the "
                     "base to the average and finds no weight for it); map_merge takes the weighted average of the listed models")
    if method_name in _CONSENSUS:
        mean = matrix.mean(axis=0, keepdims=True)
        if not np.allclose(matrix, mean):
            notes.append(f"{method_name} with unequal weights: mergekit weights the deltas before the sign election; the starting "
                         "point scales the weights to mean lambda")
        coeffs = lam * matrix / np.where(mean == 0, 1.0, mean) if normalize else lam * matrix
        if method_name == "dare_ties" and not normalize:
            notes.append("dare_ties with normalize: false sums the agreeing deltas, map_merge's Dare(ties=...) takes their mean: "
                         "the starting point is lambda * weight")
    else:
        total = everything.sum(axis=0, keepdims=True)  # linear: the listed base's weight too
        if method_name == "linear" and not normalize:
            if not np.allclose(total, 1.0):
                raise _fail("normalize", f"is false for 'linear' with weights summing to {total.ravel().tolist()}, not 1: the "
                                         "pretrained weights themselves would be scaled, which is no task arithmetic")
        elif normalize:
            if per_knot_normalising_is_inexact(groups, total.ravel()):
                notes.append("normalize: true with per-layer weights whose sum over the models varies with depth: mergekit divides "
                             "per layer, the coefficients here are normalised per knot (close, not exact)")
        coeffs = lam * matrix / np.where(np.abs(total) < 1e-8, 1.0, total) if normalize else lam * matrix
    try:
        method = operator_for(method_name, entries, flags.get("rescale"), normalize)
    except ValueError as error:
        raise RecipeError(f"mergekit recipe: {error}") from None
    if method_name == "ties" and not normalize:  # Ties takes the disjoint mean; the same trim, summed
        notes.append("ties with normalize: false sums the agreeing trimmed deltas: read as Breadcrumbs(density, gamma=0, "
                     "consensus='sum', normalize=False)")
    notes += tokenizer_notes(settings)
    for note in notes:
        log.warning("mergekit recipe: %s", note)
    return MergekitRecipe(base, dict(zip(names, [p for p, _ in entries])), method, groups, coeffs, method_name, config.get("dtype"), notes,
                  settings)


def from_mergekit(recipe: str | os.PathLike | Mapping[str, Any]) -> MergekitRecipe:
    """Read a mergekit recipe (a YAML file or its mapping) as a :class:`MergekitRecipe`: its models as
    task vectors (:meth:`MergekitRecipe.task_vectors`), its operator, coefficient groups and coefficients."""
    config = recipe if isinstance(recipe, Mapping) else read_recipe(recipe)
    return parse_recipe(config)


def coefficients_of(recipe: MergekitRecipe) -> dict[str, Any]:
    """For messages and reports: ``task/group -> coefficient``."""
    from .groups import coefficient_names

    return dict(zip(coefficient_names(list(recipe.models), recipe.groups), recipe.flat_coeffs.tolist()))


__getattr__ = renamed(globals(), {"Recipe": "MergekitRecipe"}, "map_merge.Recipe is the job an executor runs")
