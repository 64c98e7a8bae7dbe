"""mergekit recipes read as mergekit 0.1.5 reads them (issue 27): true/false settings as pydantic's
``bool`` ("false" is false), booleans as numbers where mergekit wants a number, filters that match
nothing falling back to the top-level weight, and the recipe's dtype / tokenizer settings kept in
the recipe a run from it emits. Ground truth: mergekit-yaml's behaviour on these recipes (checked
with benchmarks/bench_mergekit_conformance.py --only read) and hand computations."""

import json
import logging

import numpy as np
import pytest
import torch
import yaml

import map_merge as mm
from map_merge.mergekit_config import RecipeError, parse_recipe
from map_merge.numeric import parse_bool

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_fields")
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
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


def _two(method="task_arithmetic", weights=(0.7, 0.4), per_model=None, **shared):
    models = [{"model": f"/m/{n}", "parameters": {"weight": w, **(per_model or {})}} for n, w in zip(("a", "b"), weights)]
    return {"merge_method": method, "base_model": "/m/base", "models": models, **({"parameters": shared} if shared else {})}


# ---------------------------------------------------------------- true/false settings
@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("no", False), ("OFF", False), ("0", False), ("f", False),
                                         ("n", False), (0, False), (0.0, False), (False, False), ("true", True), ("Yes", True),
                                         ("on", True), ("1", True), ("T", True), ("y", True), (1, True), (1.0, True), (True, True)])
def test_booleans_parse_as_pydantics_bool(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("bad", ["maybe", "", " true", "1.0", 2, 0.5, None, [True]])
def test_what_pydantic_refuses_as_a_bool_is_refused(bad):
    with pytest.raises(ValueError, match="not true or false"):
        parse_bool(bad)


def test_a_quoted_false_normalize_is_false():
    # mergekit-yaml: task_arithmetic, weights 0.7, 0.4: normalize "true" divides by 1.1, "false" (a string) does not
    np.testing.assert_allclose(parse_recipe(_two(normalize="false")).coeffs[:, 0], [0.7, 0.4])
    np.testing.assert_allclose(parse_recipe(_two(normalize="no")).coeffs[:, 0], [0.7, 0.4])
    np.testing.assert_allclose(parse_recipe(_two(normalize="true")).coeffs[:, 0], [0.7 / 1.1, 0.4 / 1.1])
    # ties with normalize "false": the agreeing trimmed deltas summed (Breadcrumbs gamma 0, consensus sum, normalize False)
    ties = parse_recipe(_two("ties", weights=(1.0, 1.0), per_model={"density": 0.5}, normalize="false"))
    assert ties.method == mm.Breadcrumbs(density=0.5, gamma=0.0, scope="tensor", consensus="sum", normalize=False)
    # linear with normalize "false" and weights summing to 1: theta_0 + sum w_i tau_i
    linear = {**_two("linear", weights=(0.7, 0.4)), "parameters": {"normalize": "off"}}
    linear["models"].insert(0, {"model": "/m/base", "parameters": {"weight": -0.1}})
    np.testing.assert_allclose(parse_recipe(linear).coeffs[:, 0], [0.7, 0.4])


def test_rescale_and_int8_mask_are_read_as_mergekit_reads_them():
    crumbs = dict(per_model={"density": 0.5, "gamma": 0.1})
    assert parse_recipe(_two("breadcrumbs", rescale="yes", **crumbs)).method.rescale == "l1"
    assert parse_recipe(_two("breadcrumbs", rescale="false", **crumbs)).method.rescale is None
    assert parse_recipe(_two("della_linear", rescale="0", per_model={"density": 0.5})).method.rescale is None  # default: true
    assert parse_recipe(_two("ties", weights=(1, 1), int8_mask="yes", per_model={"density": 0.5})).method == mm.Ties(k=0.5, scope="tensor")
    for key in ("normalize", "rescale", "int8_mask"):  # mergekit-yaml: "1 validation error for bool"
        with pytest.raises(RecipeError, match=rf"field '{key}' must be true or false: got the string 'maybe'"):
            parse_recipe(_two(**{key: "maybe"}))
    with pytest.raises(RecipeError, match=r"field 'normalize' must be true or false: got 2"):
        parse_recipe(_two(normalize=2))
    with pytest.raises(RecipeError, match=r"field 'normalize' is .*per-layer or filtered normalize is not supported"):
        parse_recipe(_two(normalize=[{"filter": "mlp", "value": True}, {"value": False}]))
    # linear has no rescale, int8_mask or lambda: mergekit ignores them whatever they are, and so do we
    linear = parse_recipe(_two("linear", rescale="maybe", int8_mask="maybe", **{"lambda": "x"}))
    np.testing.assert_allclose(linear.coeffs[:, 0], [0.7 / 1.1, 0.4 / 1.1])


# ---------------------------------------------------------------- booleans where mergekit wants a number
def test_a_boolean_weight_counts_as_one_or_zero():
    # mergekit-yaml: weight true -> 1.0; [true, 0.0] a gradient from 1 to 0; lambda true -> 1.0; the string "true" is refused
    np.testing.assert_allclose(parse_recipe(_two(weights=(True, 0.5))).coeffs[:, 0], [1.0, 0.5])
    gradient = parse_recipe(_two(weights=([True, False], 0.5)))
    assert gradient.groups == mm.Groups.by_depth(2)
    np.testing.assert_allclose(gradient.coeffs, [[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(parse_recipe(_two(weights=(0.3, 0.5), **{"lambda": True})).coeffs[:, 0], [0.3, 0.5])
    assert parse_recipe(_two("ties", weights=(1, 1), per_model={"density": True})).method == mm.Ties(k=1.0, scope="tensor")
    with pytest.raises(RecipeError, match=r"field 'weight' of /m/a must be .*the string 'true', which is not a number"):
        parse_recipe(_two(weights=("true", 0.5)))


# ---------------------------------------------------------------- filters that match nothing: the top-level weight
def _states(folders):
    return {n: transformers.LlamaForCausalLM.from_pretrained(folders / n).state_dict() for n in ("base", "code", "chat")}


def _check_merge(folders, recipe, expected):
    """The merge against ``base + w_code tau_code + w_chat tau_chat`` by hand, ``key -> (w_code, w_chat)``."""
    merged = recipe.task_vectors().merge(recipe.flat_coeffs, recipe.method, dtype=torch.float32, groups=recipe.groups)
    states = _states(folders)
    for key, (w_code, w_chat) in expected.items():
        base = states["base"][key]
        torch.testing.assert_close(merged[key], base + w_code * (states["code"][key] - base) + w_chat * (states["chat"][key] - base),
                                   msg=key)


def _recipe(folders, code, chat=0.5, **shared):
    return {"merge_method": "task_arithmetic", "base_model": str(folders / "base"), "dtype": "float32",
            "models": [{"model": str(folders / "code"), "parameters": {"weight": code}},
                       {"model": str(folders / "chat"), "parameters": {"weight": chat}}], **({"parameters": shared} if shared else {})}


def test_filters_without_a_catch_all_fall_back_to_the_top_level_weight(folders):
    # mergekit-yaml: code's mlp tensors take 0.2, every other tensor the top-level 0.7; chat 0.5 everywhere
    recipe = parse_recipe(_recipe(folders, [{"filter": "mlp", "value": 0.2}], weight=0.7))
    assert recipe.groups == mm.Groups({"mlp": "mlp", "rest": ".*"})
    _check_merge(folders, recipe, {"model.layers.1.mlp.up_proj.weight": (0.2, 0.5), "model.layers.0.self_attn.q_proj.weight": (0.7, 0.5),
                                   "model.norm.weight": (0.7, 0.5), "model.embed_tokens.weight": (0.7, 0.5)})
    # the top-level weight's own filters come next, in order; its gradient at t = l / 2 (0 outside the layers)
    shared = [{"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": 0.1}, {"value": [0.0, 1.0]}]
    recipe = parse_recipe(_recipe(folders, [{"filter": "mlp", "value": 0.2}], weight=shared))
    assert list(recipe.groups.patterns.values()) == ["mlp", "self_attn", ".*"]  # the top level's mlp is never reached
    _check_merge(folders, recipe, {"model.layers.1.mlp.up_proj.weight": (0.2, 0.5), "model.layers.0.self_attn.q_proj.weight": (0.9, 0.5),
                                   "model.layers.2.input_layernorm.weight": (1.0, 0.5), "model.layers.1.post_attention_layernorm.weight":
                                   (0.5, 0.5), "model.norm.weight": (0.0, 0.5)})
    # an empty list: the top-level weight everywhere
    np.testing.assert_allclose(parse_recipe(_recipe(folders, [], weight=0.7)).coeffs[:, 0], [0.7, 0.5])


def test_filters_matching_nothing_without_a_top_level_weight_are_refused(folders):
    # mergekit-yaml: "Missing required parameter weight for .../code.model.embed_tokens.weight"
    recipe = parse_recipe(_recipe(folders, [{"filter": "mlp", "value": 0.2}]))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*match no group"):
        recipe.task_vectors().merge(recipe.flat_coeffs, recipe.method, groups=recipe.groups)
    with pytest.raises(RecipeError, match=r"field 'weight' of .*code is an empty list and the recipe has no top-level weight"):
        parse_recipe(_recipe(folders, []))


def test_unreachable_conditions_are_dropped():
    # "mlp.up" after "mlp" never matches first; the second "mlp" neither: mergekit-yaml gives up_proj 0.2
    weights = ([{"filter": "mlp", "value": 0.2}, {"filter": "mlp.up", "value": 0.9}, {"filter": "mlp", "value": 0.4}, {"value": 0.1}],
               [{"filter": "mlp", "value": 0.3}, {"value": 0.6}])
    recipe = parse_recipe(_two(weights=weights))
    assert list(recipe.groups.patterns.values()) == ["mlp", ".*"]
    np.testing.assert_allclose(recipe.coeffs, [[0.2, 0.1], [0.3, 0.6]])


def test_a_lone_unfiltered_condition_is_a_plain_weight():
    # mergekit-yaml: [{value: 0.5}] is 0.5 for every tensor, beside another model's filters too
    recipe = parse_recipe(_two(weights=([{"value": 0.5}], [{"filter": "mlp", "value": 0.2}, {"value": 0.3}])))
    assert list(recipe.groups.patterns.values()) == ["mlp", ".*"]
    np.testing.assert_allclose(recipe.coeffs, [[0.5, 0.5], [0.2, 0.3]])


def test_linear_adds_the_unlisted_base_with_the_top_level_weight():
    # mergekit-yaml adds the unlisted base to a linear merge with the shared weight: (0.3, 0.5, base 1.0) -> 0.3 / 1.8, 0.5 / 1.8
    np.testing.assert_allclose(parse_recipe(_two("linear", weights=(0.3, 0.5), weight=1.0)).coeffs[:, 0], [0.3 / 1.8, 0.5 / 1.8])


def test_linear_without_a_weight_for_the_unlisted_base_says_mergekit_refuses_it(caplog):
    # mergekit-yaml: "Missing required parameter weight for .../base.model.embed_tokens.weight"; map_merge averages the fine-tunes
    with caplog.at_level(logging.WARNING, logger="map_merge.mergekit_config"):
        recipe = parse_recipe(_two("linear", weights=(0.3, 0.5)))
    np.testing.assert_allclose(recipe.coeffs[:, 0], [0.3 / 0.8, 0.5 / 0.8])
    assert "mergekit-yaml refuses this recipe" in caplog.text and "weighted average of the listed models" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="map_merge.mergekit_config"):
        parse_recipe(_two("linear", weights=(0.3, 0.5), weight=1.0))  # a top-level weight for the base: as mergekit
    assert "refuses" not in caplog.text


# ---------------------------------------------------------------- top-level fields mergekit ignores
def test_unknown_top_level_fields_are_ignored_with_a_warning(caplog):
    # mergekit's MergeConfiguration (pydantic, extra="ignore") drops them; a typo must not pass unsaid
    with caplog.at_level(logging.WARNING, logger="map_merge.mergekit_config"):
        recipe = parse_recipe({**_two(), "merge_metod": "ties", "comment": "x"})
    np.testing.assert_allclose(recipe.coeffs[:, 0], [0.7, 0.4])
    assert "'comment', 'merge_metod'" in caplog.text and "ignore" in caplog.text
    assert any("merge_metod" in note for note in recipe.notes)
    typo = _two()
    typo["merge_metod"] = typo.pop("merge_method")
    with pytest.raises(RecipeError, match=r"field 'merge_method' is required.*'merge_metod'"):  # mergekit: Field required
        parse_recipe(typo)
    with pytest.raises(RecipeError, match=r"field 'modules' is not supported"):  # a mergekit field, not one to ignore
        parse_recipe({**_two(), "modules": {}})


# ---------------------------------------------------------------- a gradient on a one-layer model
def test_a_gradient_on_a_one_layer_model_takes_its_end_value_in_the_layer(tmp_path):
    # mergekit's planner: t = 1 for the only layer (plan.py: num_layers == 1), t = 0 for embeddings, final norm, head;
    # mergekit-yaml on such a model: layer tensors 0.8, the others 0.2
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    for name, seed in (("code", 1), ("chat", 2)):
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        model.save_pretrained(tmp_path / name)
    recipe = parse_recipe(_recipe(tmp_path, [0.2, 0.8]))
    _check_merge(tmp_path, recipe, {"model.layers.0.mlp.up_proj.weight": (0.8, 0.5), "model.layers.0.input_layernorm.weight": (0.8, 0.5),
                                    "model.embed_tokens.weight": (0.2, 0.5), "model.norm.weight": (0.2, 0.5), "lm_head.weight": (0.2, 0.5)})


# ---------------------------------------------------------------- dtype and tokenizer settings: kept, differences said
def test_settings_are_read_and_what_mergekit_refuses_is_refused():
    recipe = parse_recipe({**_two(), "dtype": "bfloat16", "out_dtype": "torch.float16", "tokenizer_source": "union",
                           "chat_template": "chatml"})
    assert recipe.settings == {"dtype": "bfloat16", "out_dtype": "torch.float16", "tokenizer_source": "union", "chat_template": "chatml"}
    assert any("tokenizer_source: 'union'" in n for n in recipe.notes) and any("chat_template" in n for n in recipe.notes)
    assert not parse_recipe({**_two(), "dtype": "float32", "tokenizer_source": "base"}).notes
    with pytest.raises(RecipeError, match=r"field 'dtype' is 'fp32'; mergekit reads"):  # mergekit: Unimplemented dtype "fp32"
        parse_recipe({**_two(), "dtype": "fp32"})
    with pytest.raises(RecipeError, match=r"'tokenizer' and 'tokenizer_source' are both given"):
        parse_recipe({**_two(), "tokenizer_source": "base", "tokenizer": {"source": "union"}})


def test_dtype_note_says_what_the_saved_folder_does_differently():
    from map_merge.mergekit_settings import dtype_note

    # mergekit writes out_dtype, else dtype; config.json's torch_dtype says the same
    note = dtype_note({"dtype": "float32", "out_dtype": "float16"}, [torch.float32], torch.float32)
    assert "mergekit writes float16 tensors" in note and "(float32)" in note and "merges in" not in note
    assert "mergekit merges in bfloat16, map_merge in float32" in dtype_note({"dtype": "bfloat16"}, [torch.bfloat16], torch.float32)
    assert dtype_note({"dtype": "float32"}, [torch.float32, torch.int64], torch.float32) is None
    assert dtype_note({}, [torch.bfloat16], torch.float32) is None


def _cli_files(folders, tmp_path, **settings):
    (tmp_path / "user.py").write_text("def evaluate(model, task):\n    return 0.0\n")
    recipe = {**_recipe(folders, 0.7, 0.4), **settings}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "run.json").write_text(json.dumps({"evaluator": "user.py:evaluate", "out": str(tmp_path / "out"), "num_samples": 8,
                                                   "link": "identity"}))
    return tmp_path / "run.json", tmp_path / "recipe.yaml"


def test_cli_save_keeps_the_recipes_settings_and_warns_about_the_dtype(folders, tmp_path, caplog):
    from safetensors import safe_open

    from map_merge.cli import main

    settings = {"dtype": "float32", "out_dtype": "bfloat16", "tokenizer_source": "union", "chat_template": "chatml"}
    config, recipe = _cli_files(folders, tmp_path, **settings)
    with caplog.at_level(logging.WARNING):
        assert main(["save", "--config", str(config), "--mergekit", str(recipe), "--coeffs", "0.3,0.4", "--out", str(tmp_path / "m"),
                     "--emit-mergekit", str(tmp_path / "emitted.yaml")]) == 0
    emitted = yaml.safe_load((tmp_path / "emitted.yaml").read_text())
    assert {k: emitted[k] for k in settings} == settings  # written back as read (was: dtype float32, the rest dropped)
    assert [m["parameters"]["weight"] for m in emitted["models"]] == [0.3, 0.4]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float32  # the pretrained checkpoint's dtype, not bfloat16
    assert "mergekit writes bfloat16 tensors" in caplog.text and "keeps the pretrained checkpoint's dtypes (float32)" in caplog.text


def test_cli_run_from_a_recipe_emits_its_settings(folders, tmp_path, caplog):
    from map_merge.cli import main

    config, recipe = _cli_files(folders, tmp_path, dtype="bfloat16", tokenizer_source="base")
    with caplog.at_level(logging.WARNING):
        assert main(["map", "--config", str(config), "--mergekit", str(recipe), "--emit-mergekit"]) == 0
    emitted = yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())
    assert emitted["dtype"] == "bfloat16" and emitted["tokenizer_source"] == "base"
    assert "mergekit merges in bfloat16, map_merge in float32" in caplog.text
