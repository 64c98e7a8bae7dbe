"""The recipes ``bench_mergekit_conformance.py`` runs through mergekit and through map_merge: the
operators' recipes (one per mirrored operator), the configs map_merge emits, and mergekit configs
as users write them (read by ``mm.from_mergekit``). Each catalogue is plain data; the benchmark
runs them."""

from __future__ import annotations

import map_merge as mm

DENSITY, GAMMA, EPSILON, LAMBDA = 0.6, 0.05, 0.15, 0.5
"""TIES / Breadcrumbs / DELLA density, Breadcrumbs' gamma, DELLA's epsilon, the TIES lambda."""


def emitted_recipes() -> list[tuple[str, list, mm.MergeMethod | None, mm.Groups | None]]:
    """``(label, our coefficients (T x G, task-major), operator, groups)`` written for mergekit."""
    depth = mm.Groups.by_depth(3)
    parts = mm.Groups({"attn": "self_attn", "mlp": "mlp", "rest": ".*"})
    return [
        ("task arithmetic", [0.3, 0.7], None, None),
        ("TIES k=0.6", [0.5, 0.5], mm.Ties(k=DENSITY, scope="tensor"), None),
        ("TIES k=0.5", [0.5, 0.5], mm.Ties(k=0.5, scope="tensor"), None),
        ("Breadcrumbs", [0.6, 0.9], mm.Breadcrumbs(DENSITY, GAMMA), None),
        ("task arithmetic, depth knots 3", [0.2, 0.5, 0.9, 0.8, 0.4, -0.1], None, depth),
        ("task arithmetic, attn/mlp/rest", [0.7, 0.2, 0.5, 0.3, 0.9, 0.4], None, parts),
        ("Breadcrumbs, depth knots 3", [0.2, 0.5, 0.9, 0.8, 0.4, -0.1], mm.Breadcrumbs(DENSITY, GAMMA), depth),
    ]


def read_recipes() -> list[tuple]:
    """``(label, mergekit method, per-model weight settings, per-model parameters, shared parameters)``,
    optionally with ``extra`` top-level fields (a sixth item)."""
    in_filters = [[{"filter": "self_attn", "value": [0.1, 0.9, 0.4]}, {"filter": "mlp", "value": 0.6}, {"value": 0.5}],
                  [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.7, 0.2, 0.6]}, {"value": [1.0, 0.5, 0.0]}]]
    return [
        ("mixed weight forms", "task_arithmetic", [[0.2, 0.5, 0.8], [{"filter": "self_attn", "value": 0.3},
                                                                     {"filter": "mlp", "value": 0.8}, {"value": 0.5}]], {}, {}),
        ("number beside filters", "task_arithmetic", [0.7, [{"filter": "mlp", "value": 0.2}, {"value": 0.9}]], {}, {"lambda": 0.8}),
        ("gradient in a filter", "task_arithmetic", in_filters, {}, {}),
        ("gradient in a filter, normalize", "task_arithmetic",  # every pattern's total constant over depth: exact
         [[{"filter": "self_attn", "value": [0.1, 0.9, 0.4]}, {"filter": "mlp", "value": 0.6}, {"value": [0.0, 0.5, 1.0]}],
          [{"filter": "self_attn", "value": [0.9, 0.1, 0.6]}, {"filter": "mlp", "value": 0.2}, {"value": [1.0, 0.5, 0.0]}]],
         {}, {"normalize": True}),
        ("Breadcrumbs, gradient in a filter", "breadcrumbs", in_filters, {"density": DENSITY, "gamma": GAMMA}, {}),
        ("'1e-1' weight", "task_arithmetic", ["1e-1", 0.5], {}, {}),
        ("'1e-1' in a gradient", "task_arithmetic", [["1e-1", "5e-1", 0.9], "2e-1"], {}, {"lambda": "1.5e0"}),
        ("normalize: 'true' (a string)", "task_arithmetic", [0.3, 0.5], {}, {"normalize": "true"}),
        ("ties, normalize: 'false' (a string)", "ties", [1.0, 1.0], {"density": 0.5}, {"normalize": "false", "lambda": LAMBDA}),
        ("Breadcrumbs, rescale: 'yes'", "breadcrumbs", [0.6, 0.9], {"density": DENSITY, "gamma": GAMMA}, {"rescale": "yes"}),
        ("weight: true", "task_arithmetic", [True, [True, False, 0.5]], {}, {"lambda": 0.5}),
        ("filters, no catch-all: top-level weight", "task_arithmetic", [[{"filter": "mlp", "value": 0.2}], 0.5], {}, {"weight": 0.7}),
        ("filters, no catch-all: top-level filters", "task_arithmetic", [[{"filter": "mlp", "value": 0.2}], [{"value": 0.5}]], {},
         {"weight": [{"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": 0.1}, {"value": [0.0, 1.0]}]}),
        ("weight: [] (the top-level weight)", "task_arithmetic", [[], 0.4], {}, {"weight": 0.7}),
        ("linear, unlisted base: top-level weight", "linear", [0.3, 0.5], {}, {"weight": 1.0}),
        ("filters differ: self_attn / mlp", "task_arithmetic", [[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
                                                                [{"filter": "mlp", "value": 0.8}, {"value": 0.1}]], {}, {}),
        ("the same filters in another order", "task_arithmetic",
         [[{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.6}, {"value": 0.5}],
          [{"filter": "mlp", "value": [0.8, 0.2, 0.4]}, {"filter": "self_attn", "value": 0.2}, {"value": 0.1}]], {}, {}),
        ("filters differ: top-level fallback vs own catch-all", "task_arithmetic",
         [[{"filter": "mlp", "value": 0.2}], [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]], {},
         {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": [0.0, 1.0]}]}),
        ("filters meeting in one tensor (self_attn, layers.1.)", "task_arithmetic",
         [[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}], [{"filter": "layers.1.", "value": 0.8}, {"value": 0.1}]], {}, {}),
        ("Breadcrumbs, filters differ", "breadcrumbs", [[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
                                                         [{"filter": "mlp", "value": 0.8}, {"value": 0.1}]],
         {"density": DENSITY, "gamma": GAMMA}, {}),
        ("a filter matching no tensor ('experts')", "task_arithmetic", [[{"filter": "experts", "value": 0.9}, {"value": 0.5}], 0.1], {}, {}),
        ("unknown top-level fields (merge_metod, comment)", "task_arithmetic", [0.3, 0.5], {}, {},
         {"merge_metod": "ties", "comment": "ignored"}),
        ("linear, unlisted base, no top-level weight", "linear", [0.3, 0.5], {}, {}),  # mergekit refuses: a row saying so
    ]


def one_layer_recipes() -> list[tuple]:
    """Recipes for a one-layer model: a gradient there takes its end value (mergekit's t = 1)."""
    return [("one layer: gradient [0.2, 0.8]", "task_arithmetic", [[0.2, 0.8], 0.5], {}, {}),
            ("one layer: gradient in a filter", "task_arithmetic", [[{"filter": "mlp", "value": [0.2, 0.7, 0.9]}, {"value": 0.4}], 0.5],
             {}, {})]


def recipes(num: int) -> list[tuple[str, str, list[float], dict, dict, mm.MergeMethod | None, list[float]]]:
    """``(label, mergekit method, weights, per-model parameters, shared parameters, our operator, our c)``."""
    lam = [LAMBDA] * num
    return [
        ("task arithmetic", "task_arithmetic", [0.3, 0.7][:num], {}, {}, None, [0.3, 0.7][:num]),
        ("TIES", "ties", [1.0] * num, {"density": DENSITY}, {"normalize": True, "lambda": LAMBDA}, mm.Ties(k=DENSITY, scope="tensor"), lam),
        ("Breadcrumbs, one model", "breadcrumbs", [1.0], {"density": DENSITY, "gamma": GAMMA}, {}, mm.Breadcrumbs(DENSITY, GAMMA), [1.0]),
        ("Breadcrumbs", "breadcrumbs", [0.6, 0.9][:num], {"density": DENSITY, "gamma": GAMMA}, {}, mm.Breadcrumbs(DENSITY, GAMMA), [0.6, 0.9][:num]),
        ("Breadcrumbs + TIES consensus", "breadcrumbs_ties", [1.0] * num, {"density": DENSITY, "gamma": GAMMA}, {"lambda": LAMBDA},
         mm.Breadcrumbs(DENSITY, GAMMA, consensus="sum"), lam),
    ]
