"""mergekit recipes whose models' ``filter`` lists differ (issue 27): mergekit 0.1.5 gives each tensor,
per model, the value of the first of that model's filters that is a substring of its name
(``mergekit/config.py``: ``evaluate_setting``), whatever the other models filter. Read, the
coefficient groups are the cells of the joint partition (tensors every model's filters treat
alike). Ground truth: that rule written out here (``_mergekit_value``), hand computations on a tiny
Llama, and mergekit-yaml on these recipes (benchmarks/bench_mergekit_conformance.py --only read)."""

import numpy as np
import pytest
import torch

import map_merge as mm
from map_merge.mergekit_config import RecipeError, emit_recipe, parse_recipe

transformers = pytest.importorskip("transformers")

ATTN, MLP, NORM, EMBED = ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                          "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_joint")
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    for name, seed in (("code", 1), ("chat", 2)):
        model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        model.save_pretrained(root / name)
    return root


def _recipe(root, code, chat, **shared):
    return {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
            "models": [{"model": str(root / "code"), "parameters": {"weight": code}},
                       {"model": str(root / "chat"), "parameters": {"weight": chat}}], **({"parameters": shared} if shared else {})}


def _check_merge(folders, recipe, expected):
    """The merge against ``base + w_code tau_code + w_chat tau_chat`` by hand, ``key -> (w_code, w_chat)``."""
    merged = recipe.task_vectors().merge(recipe.flat_coeffs, recipe.method, dtype=torch.float32, groups=recipe.groups)
    states = {n: transformers.LlamaForCausalLM.from_pretrained(folders / n).state_dict() for n in ("base", "code", "chat")}
    for key, (w_code, w_chat) in expected.items():
        base = states["base"][key]
        torch.testing.assert_close(merged[key], base + w_code * (states["code"][key] - base) + w_chat * (states["chat"][key] - base),
                                   msg=key)


def _mergekit_value(conditions, name):
    """mergekit's rule for one model: the first condition whose filter is missing or a substring of ``name``."""
    return next((c["value"] for c in conditions if c.get("filter") is None or c["filter"] in name), None)


def test_models_filtering_different_tensors_merge_as_mergekit(folders):
    # code: self_attn 0.3, else 0.5; chat: mlp 0.8, else 0.1. No Llama tensor is both, so three groups
    recipe = parse_recipe(_recipe(folders, [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
                                  [{"filter": "mlp", "value": 0.8}, {"value": 0.1}]))
    assert recipe.groups == mm.Groups({"self_attn": "self_attn", "mlp": "mlp", "rest": ".*"})
    np.testing.assert_allclose(recipe.coeffs, [[0.3, 0.5, 0.5], [0.1, 0.8, 0.1]])
    _check_merge(folders, recipe, {ATTN: (0.3, 0.1), MLP: (0.5, 0.8), NORM: (0.5, 0.1), EMBED: (0.5, 0.1)})


def test_the_same_filters_in_another_order_and_different_fallbacks(folders):
    order = parse_recipe(_recipe(folders, [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.6}, {"value": 0.5}],
                                 [{"filter": "mlp", "value": 0.8}, {"filter": "self_attn", "value": 0.2}, {"value": 0.1}]))
    assert list(order.groups.names) == ["self_attn", "mlp", "rest"]
    np.testing.assert_allclose(order.coeffs, [[0.3, 0.6, 0.5], [0.2, 0.8, 0.1]])
    _check_merge(folders, order, {ATTN: (0.3, 0.2), MLP: (0.6, 0.8), NORM: (0.5, 0.1)})
    # code falls back to the top-level filters (self_attn 0.9, then a gradient over the 2 layers), chat has its own catch-all
    shared = [{"filter": "self_attn", "value": 0.9}, {"value": [0.0, 1.0]}]
    fallback = parse_recipe(_recipe(folders, [{"filter": "mlp", "value": 0.2}], [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                                    weight=shared))
    _check_merge(folders, fallback, {ATTN: (0.9, 0.6), MLP: (0.2, 0.3), NORM: (1.0, 0.6), EMBED: (0.0, 0.6),
                                     "model.layers.0.post_attention_layernorm.weight": (0.0, 0.6)})


def test_tensors_that_two_filters_match_are_a_group_of_their_own(folders):
    # chat filters by layer: layer 1's attention is self_attn for code and layers.1. for chat
    recipe = parse_recipe(_recipe(folders, [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
                                  [{"filter": "layers.1.", "value": 0.8}, {"value": 0.1}]))
    assert recipe.groups.names == ("self_attn&layers_1", "self_attn", "layers_1", "rest")
    np.testing.assert_allclose(recipe.coeffs, [[0.3, 0.3, 0.5, 0.5], [0.8, 0.1, 0.8, 0.1]])
    _check_merge(folders, recipe, {ATTN: (0.3, 0.8), "model.layers.0.self_attn.k_proj.weight": (0.3, 0.1), NORM: (0.5, 0.8),
                                   MLP: (0.5, 0.1), EMBED: (0.5, 0.1)})
    with pytest.raises(RecipeError, match=r"'self_attn&layers_1'.*both"):  # no single mergekit filter selects that cell
        emit_recipe(str(folders / "base"), dict(recipe.models), recipe.coeffs, None, recipe.groups)


def test_a_filter_matching_no_tensor_is_dropped(folders, caplog):
    # mergekit never uses it; a merge with its group would refuse a group owning nothing
    recipe = parse_recipe(_recipe(folders, [{"filter": "experts", "value": 0.9}, {"value": 0.5}], 0.1))
    assert recipe.groups is None and any("'experts'" in note for note in recipe.notes)
    np.testing.assert_allclose(recipe.coeffs, [[0.5], [0.1]])
    _check_merge(folders, recipe, {ATTN: (0.5, 0.1)})


def test_group_names_survive_a_round_trip(folders):
    recipe = parse_recipe(_recipe(folders, [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
                                  [{"filter": "mlp", "value": [0.8, 0.2]}, {"value": 0.1}]))
    again = parse_recipe(emit_recipe(str(folders / "base"), dict(recipe.models), recipe.coeffs, None, recipe.groups))
    assert again.groups == recipe.groups and again.groups.names == ("self_attn.knot0", "self_attn.knot1", "mlp.knot0", "mlp.knot1",
                                                                    "rest.knot0", "rest.knot1")
    np.testing.assert_allclose(again.coeffs, recipe.coeffs)


def test_the_joint_groups_give_every_tensor_each_models_mergekit_value():
    # no model folders here (no tensor names to drop empty groups by): random filter lists over a small alphabet
    rng = np.random.default_rng(0)
    pieces = ["a", "b", "ab", "c", "bc", "d"]
    names = ["".join(rng.choice(pieces, size=rng.integers(0, 4))) + "." + str(i) for i in range(300)]
    for trial in range(30):
        weights = []
        for _ in range(3):
            filters = list(rng.choice(pieces, size=rng.integers(1, 4), replace=False))
            conditions = [{"filter": str(f), "value": float(rng.integers(1, 100))} for f in filters]
            weights.append(conditions + [{"value": float(rng.integers(1, 100))}])
        config = {"merge_method": "task_arithmetic", "base_model": "/m/base",
                  "models": [{"model": f"/m/m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]}
        recipe = parse_recipe(config)
        got = recipe.coeffs @ recipe.groups.weights(names).T  # (T, names)
        expected = [[_mergekit_value(w, name) for name in names] for w in weights]
        np.testing.assert_allclose(got, expected, err_msg=str(weights))
