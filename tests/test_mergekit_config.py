"""mergekit recipes in and out: a round trip keeps models, method and weights; recipes merge as
mergekit defines them; what mergekit cannot reproduce, or cannot be read, is refused naming the field."""

import numpy as np
import pytest
import torch
import yaml

import map_merge as mm
from map_merge.mergekit_config import RecipeError, emit_recipe, parse_recipe

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
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


def _recipe(root, **overrides):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "dtype": "float32",
              "models": [{"model": str(root / "code"), "parameters": {"weight": 0.7}},
                         {"model": str(root / "chat"), "parameters": {"weight": 0.4}}]}
    recipe.update(overrides)
    return recipe


@pytest.mark.parametrize("weights, groups", [
    ((0.7, 0.4), None),
    (([0.2, 0.5, 0.9], [1.0, 0.5, 0.0]), mm.Groups.by_depth(3)),
    (([{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.8}, {"value": 0.5}],
      [{"filter": "self_attn", "value": 0.6}, {"filter": "mlp", "value": 0.1}, {"value": 0.2}]), "filters"),
])
def test_round_trip_keeps_models_method_and_weights(folders, tmp_path, weights, groups):
    recipe = _recipe(folders)
    for entry, weight in zip(recipe["models"], weights):
        entry["parameters"]["weight"] = weight
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    parsed = mm.from_mergekit(path)
    assert list(parsed.models) == ["code", "chat"] and isinstance(parsed.method, mm.TaskArithmetic)
    if groups == "filters":
        assert parsed.groups.patterns == {"self_attn": "self_attn", "mlp": "mlp", "rest": ".*"}
    else:
        assert parsed.groups == groups
    tv = parsed.task_vectors()
    emitted = tv.mergekit_config(parsed.flat_coeffs, parsed.method, parsed.groups)
    assert emitted["merge_method"] == "task_arithmetic" and emitted["base_model"] == str((folders / "base").resolve())
    assert [m["model"] for m in emitted["models"]] == [str((folders / n).resolve()) for n in ("code", "chat")]
    assert [m["parameters"]["weight"] for m in emitted["models"]] == list(weights)
    again = parse_recipe(emitted)
    np.testing.assert_allclose(again.coeffs, parsed.coeffs)


@pytest.mark.parametrize("method, weights, per_model, shared, operator", [
    ("breadcrumbs", (0.7, 0.4), {"density": 0.6, "gamma": 0.05}, {}, mm.Breadcrumbs(0.6, 0.05)),
    ("ties", (1.0, 1.0), {"density": 0.3}, {"lambda": 0.8}, mm.Ties(k=0.3, scope="tensor")),
    ("della_linear", (0.5, 0.9), {"density": 0.5, "epsilon": 0.1}, {}, mm.Della(0.5, 0.1, rescale="l1", consensus=None, normalize=False)),
])
def test_round_trip_keeps_the_operator_and_its_settings(folders, tmp_path, method, weights, per_model, shared, operator):
    recipe = _recipe(folders, merge_method=method, parameters=shared,
                     models=[{"model": str(folders / n), "parameters": {"weight": w, **per_model}} for n, w in zip(("code", "chat"), weights)])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    parsed = mm.from_mergekit(path)
    assert parsed.method == operator and parsed.groups is None
    emitted = parsed.task_vectors().mergekit_config(parsed.flat_coeffs, parsed.method)
    assert emitted["merge_method"] == method
    assert [m["model"] for m in emitted["models"]] == [str((folders / n).resolve()) for n in ("code", "chat")]
    assert [m["parameters"] for m in emitted["models"]] == [{"weight": w, **per_model} for w in weights]
    assert emitted["parameters"].get("lambda", 1.0) == shared.get("lambda", 1.0)
    np.testing.assert_allclose(parse_recipe(emitted).coeffs, parsed.coeffs)


def test_a_recipe_merges_as_mergekit_defines_it(folders):
    # task_arithmetic: base + lambda * sum w_i tau_i; normalize divides by sum w
    recipe = parse_recipe(_recipe(folders, parameters={"lambda": 0.5, "normalize": True}))
    np.testing.assert_allclose(recipe.coeffs[:, 0], [0.5 * 0.7 / 1.1, 0.5 * 0.4 / 1.1])
    merged = recipe.task_vectors().merge(recipe.flat_coeffs, recipe.method, dtype=torch.float32)
    states = {n: transformers.LlamaForCausalLM.from_pretrained(folders / n).state_dict() for n in ("base", "code", "chat")}
    key = "model.layers.2.mlp.down_proj.weight"
    expected = states["base"][key] + 0.5 * (0.7 * (states["code"][key] - states["base"][key]) + 0.4 * (states["chat"][key] - states["base"][key])) / 1.1
    torch.testing.assert_close(merged[key], expected)
    ties = parse_recipe(_recipe(folders, merge_method="ties", parameters={"lambda": 0.8},
                                models=[{"model": str(folders / n), "parameters": {"weight": 1.0, "density": 0.3}} for n in ("code", "chat")]))
    assert ties.method == mm.Ties(k=0.3, scope="tensor") and ties.coeffs[:, 0].tolist() == [0.8, 0.8]
    assert parse_recipe(_recipe(folders, merge_method="della_linear")).method.consensus is None
    linear = parse_recipe({**_recipe(folders, merge_method="linear"), "models": [
        {"model": str(folders / "base"), "parameters": {"weight": 1.0}}, *_recipe(folders)["models"]]})
    # the base listed among the models carries no vector, but its weight counts in mergekit's average
    np.testing.assert_allclose(linear.coeffs[:, 0], [0.7 / 2.1, 0.4 / 2.1])


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "slerp"}, r"field 'merge_method' is 'slerp'"),
    ({"models": []}, r"field 'models' must be a non-empty list"),
    ({"base_model": None}, r"field 'base_model' is required"),
    ({"slices": []}, r"field 'slices' is not supported"),
    ({"models": [{"model": "a", "parameters": {"weight": [0.1, 0.2]}}, {"model": "b", "parameters": {"weight": [0.1, 0.2, 0.3]}}]},
     r"field 'weight' gradients of different lengths \[2, 3\]"),
    ({"models": [{"model": "a", "parameters": {}}]}, r"field 'models\[0\].parameters.weight' is required"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.2}},
                                         {"model": "b", "parameters": {"weight": 1, "density": 0.5}}]}, r"field 'density' differs"),
])
def test_bad_recipes_name_the_field(folders, change, message):
    recipe = {**_recipe(folders), **change}
    if recipe.get("base_model") is None:
        recipe.pop("base_model")
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


def test_what_mergekit_cannot_reproduce_is_refused():
    models = {"a": "/m/a", "b": "/m/b"}
    with pytest.raises(RecipeError, match="unequal coefficients"):
        emit_recipe("/m/base", models, np.array([0.3, 0.5]), mm.Ties(k=0.2, scope="tensor"))
    with pytest.raises(RecipeError, match="scope='tensor'"):
        emit_recipe("/m/base", models, np.array([0.3, 0.3]), mm.Ties(k=0.2))
    with pytest.raises(RecipeError, match="random masks"):
        emit_recipe("/m/base", models, np.array([0.3, 0.3]), mm.Dare(p=0.5))
    with pytest.raises(RecipeError, match="not a plain substring"):
        emit_recipe("/m/base", models, np.ones((2, 2)), None, mm.Groups({"attn": r"self_attn|mlp", "rest": ".*"}))
    tied = emit_recipe("/m/base", models, np.array([0.6, 0.6]), mm.Ties(k=0.2, scope="tensor"))
    assert tied["parameters"] == {"normalize": True, "lambda": 0.6} and tied["models"][0]["parameters"] == {"weight": 1.0, "density": 0.2}


_EVAL = '''
def evaluate(model, task):
    # a smooth score of the merged final norm: each task prefers its own fine-tune's
    import torch
    target = {"code": 1.05, "chat": 0.95}[task]
    return float(-((model.model.norm.weight.float() - target) ** 2).mean())
'''


def test_cli_runs_a_mergekit_recipe_and_emits_one(folders, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from map_merge.cli import main

    (tmp_path / "user.py").write_text(_EVAL)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_recipe(folders, models=[
        {"model": str(folders / "code"), "parameters": {"weight": [0.2, 0.6]}},
        {"model": str(folders / "chat"), "parameters": {"weight": [0.5, 0.1]}}])))
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"evaluator": "user.py:evaluate", "out": str(tmp_path / "out"), "num_samples": 16, "link": "identity"}))
    assert main(["map", "--config", str(config), "--mergekit", str(tmp_path / "recipe.yaml"), "--emit-mergekit"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["samples"]["coeffs"][0] == [0.2, 0.6, 0.5, 0.1]  # the recipe's weights, evaluated first
    assert set(summary["coefficients"]) == {"code/knot0", "code/knot1", "chat/knot0", "chat/knot1"}
    emitted = yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())
    assert [m["parameters"]["weight"] for m in emitted["models"]] == [summary["coeffs"][:2], summary["coeffs"][2:]]
    saved = load_file(str(next((tmp_path / "out" / "merged").glob("*.safetensors"))))
    assert "model.norm.weight" in saved or any(k.endswith("norm.weight") for k in saved)
    config.write_text(json.dumps({"evaluator": "user.py:evaluate", "pretrained": str(folders / "base"), "finetuned": {}}))
    assert main(["map", "--config", str(config), "--mergekit", str(tmp_path / "recipe.yaml")]) == 2
    assert "field 'pretrained' comes from the mergekit recipe" in capsys.readouterr().err


# ---------------------------------------------------------------- mergekit's defaults and semantics, read exactly
def _two(method, weights=(0.7, 0.4), per_model=None, **shared):
    models = [{"model": f"/m/{n}", "parameters": {"weight": w, **(per_model or {})}} for n, w in zip(("a", "b"), weights)]
    return {"merge_method": method, "base_model": "/m/base", "models": models, **({"parameters": shared} if shared else {})}


@pytest.mark.parametrize("method", ["breadcrumbs", "della_linear", "dare_linear"])
def test_normalize_without_consensus_divides_the_weights(method):
    # mergekit: lambda * sum w_i V'_i / sum w_i; the operator itself has no consensus to normalise
    recipe = parse_recipe(_two(method, per_model={"density": 0.5}, normalize=True, **{"lambda": 0.5}))
    np.testing.assert_allclose(recipe.coeffs[:, 0], [0.5 * 0.7 / 1.1, 0.5 * 0.4 / 1.1])
    assert getattr(recipe.method, "normalize", False) is False


def test_breadcrumbs_ties_keeps_mergekits_default_normalize_false():
    recipe = parse_recipe(_two("breadcrumbs_ties", weights=(1.0, 1.0), per_model={"density": 0.5, "gamma": 0.1}))
    assert recipe.method.consensus == "sum" and recipe.method.normalize is False  # mergekit sums the agreeing deltas
    emitted = emit_recipe("/m/base", {"a": "/m/a", "b": "/m/b"}, recipe.coeffs, recipe.method)
    assert emitted["parameters"]["normalize"] is False
    assert parse_recipe(emitted).method == recipe.method


def test_ties_without_normalize_sums_the_agreeing_trimmed_deltas():
    recipe = parse_recipe(_two("ties", weights=(1.0, 1.0), per_model={"density": 0.5}, normalize=False))
    vectors = torch.tensor([[4.0, -1.0, 2.0, 0.5], [3.0, 2.0, -0.1, -6.0]])
    # trim to the top 2 of each: [4, 0, 2, 0], [3, 0, 0, -6]; signs of the sums: +, +, +, -; sum of the agreeing
    prepared = recipe.method.prepare(vectors)
    np.testing.assert_allclose(prepared.sum(0).numpy(), [7.0, 0.0, 2.0, -6.0])
    np.testing.assert_allclose(recipe.coeffs[:, 0], [1.0, 1.0])


def test_linear_counts_the_base_models_weight():
    # mergekit's linear: sum_j w_j theta_j / sum_j w_j over every listed model, the base included
    config = {**_two("linear"), "models": [{"model": "/m/base", "parameters": {"weight": 1.0}}, *_two("linear")["models"]]}
    np.testing.assert_allclose(parse_recipe(config).coeffs[:, 0], [0.7 / 2.1, 0.4 / 2.1])
    np.testing.assert_allclose(parse_recipe(_two("linear")).coeffs[:, 0], [0.7 / 1.1, 0.4 / 1.1])
    summed = {**config, "parameters": {"normalize": False}}
    summed["models"][0]["parameters"]["weight"] = -0.1  # weights summing to 1: theta_0 + sum w_i tau_i
    np.testing.assert_allclose(parse_recipe(summed).coeffs[:, 0], [0.7, 0.4])
    with pytest.raises(RecipeError, match="field 'normalize'"):  # sum_j w_j != 1 scales the base: no task arithmetic
        parse_recipe({**_two("linear"), "parameters": {"normalize": False}})


def test_normalized_gradient_with_a_varying_total_is_noted():
    # per layer mergekit divides interp(w_i) by interp(sum w): not a linear interpolation of knots
    recipe = parse_recipe(_two("task_arithmetic", weights=([1.0, 1.0], [1.0, 3.0]), normalize=True))
    assert any("normalize" in note for note in recipe.notes)
    assert not parse_recipe(_two("task_arithmetic", weights=([1.0, 3.0], [3.0, 1.0]), normalize=True)).notes  # constant total: exact


def test_della_without_normalize_is_emitted():
    della = mm.Della(0.5, 0.1, consensus="sum", normalize=False)
    emitted = emit_recipe("/m/base", {"a": "/m/a", "b": "/m/b"}, np.array([0.6, 0.6]), della)
    assert emitted["merge_method"] == "della" and emitted["parameters"]["normalize"] is False
    assert parse_recipe(emitted).method == della


def test_filters_whose_names_collide_stay_separate_groups():
    weights = [[{"filter": "self_attn", "value": 0.1}, {"filter": "self.attn", "value": 0.2}, {"value": 0.3}],
               [{"filter": "self_attn", "value": 0.4}, {"filter": "self.attn", "value": 0.5}, {"value": 0.6}]]
    recipe = parse_recipe(_two("task_arithmetic", weights=weights))
    assert list(recipe.groups.patterns.values()) == ["self_attn", r"self\.attn", ".*"]
    np.testing.assert_allclose(recipe.coeffs, [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])


def test_recipe_coefficients_follow_the_task_order_asked_for():
    recipe = parse_recipe(_two("task_arithmetic", weights=([0.1, 0.2], [0.3, 0.4])))
    np.testing.assert_allclose(recipe.coeffs_for(["b", "a"]), [0.3, 0.4, 0.1, 0.2])
    np.testing.assert_allclose(recipe.coeffs_for(["b"]), [0.3, 0.4])
    with pytest.raises(RecipeError, match="'c'"):
        recipe.coeffs_for(["c"])


def _cli_setup(folders, tmp_path, recipe, **config):
    import json

    (tmp_path / "user.py").write_text(_EVAL)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"evaluator": "user.py:evaluate", "out": str(tmp_path / "out"), "num_samples": 16, "link": "identity",
                                **config}))
    return path


def test_cli_recipe_start_follows_the_configs_task_order(folders, tmp_path):
    import json

    from map_merge.cli import main

    config = _cli_setup(folders, tmp_path, _recipe(folders, models=[
        {"model": str(folders / "code"), "parameters": {"weight": [0.2, 0.6]}},
        {"model": str(folders / "chat"), "parameters": {"weight": [0.5, 0.1]}}]), tasks=["chat", "code"])
    assert main(["map", "--config", str(config), "--mergekit", str(tmp_path / "recipe.yaml")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["summary"]["tasks"] == ["chat", "code"]
    assert result["samples"]["coeffs"][0] == [0.5, 0.1, 0.2, 0.6]  # chat's knots first, as the task vectors are built


def test_cli_run_whose_pick_mergekit_cannot_reproduce_keeps_its_results(folders, tmp_path, monkeypatch):
    import json

    from map_merge.cli import main
    from map_merge.map import MAPResult

    config = _cli_setup(folders, tmp_path, _recipe(folders, merge_method="ties", models=[
        {"model": str(folders / n), "parameters": {"weight": 1.0, "density": 0.5}} for n in ("code", "chat")]))
    monkeypatch.setattr(MAPResult, "select", lambda self, preference: np.array([0.2, 0.7]))  # a pick TIES cannot emit
    assert main(["map", "--config", str(config), "--mergekit", str(tmp_path / "recipe.yaml"), "--emit-mergekit"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())  # written although no recipe could be
    assert not (tmp_path / "out" / "mergekit.yaml").exists() and "unequal coefficients" in result["summary"]["mergekit"]
    assert (tmp_path / "out" / "merged").is_dir()


def test_cli_run_refuses_an_unwritable_recipe_before_evaluating(folders, tmp_path, capsys):
    from map_merge.cli import main

    config = _cli_setup(folders, tmp_path, _recipe(folders), pretrained=str(folders / "base"),
                        finetuned={n: str(folders / n) for n in ("code", "chat")}, groups={"both": "self_attn|mlp", "rest": ".*"})
    assert main(["map", "--config", str(config), "--emit-mergekit"]) == 2
    assert "not a plain substring" in capsys.readouterr().err and not (tmp_path / "out" / "evaluations.sqlite").exists()


def test_cli_save_never_writes_a_recipe_over_an_existing_file(folders, tmp_path, capsys):
    from map_merge.cli import main

    config = _cli_setup(folders, tmp_path, _recipe(folders))
    (tmp_path / "kept.yaml").write_text("mine\n")
    args = ["save", "--config", str(config), "--mergekit", str(tmp_path / "recipe.yaml"), "--coeffs", "0.3,0.4"]
    assert main([*args, "--out", str(tmp_path / "m1"), "--emit-mergekit", str(tmp_path / "kept.yaml")]) == 2
    assert (tmp_path / "kept.yaml").read_text() == "mine\n" and not (tmp_path / "m1").exists()  # refused before any save
    for protected in ("recipe.yaml", "run.json"):  # the run's own inputs: never, whatever --overwrite says
        before = (tmp_path / protected).read_text()
        assert main([*args, "--out", str(tmp_path / "m2"), "--overwrite", "--emit-mergekit", str(tmp_path / protected)]) == 2
        assert (tmp_path / protected).read_text() == before
    assert main([*args, "--out", str(tmp_path / "m3"), "--emit-mergekit", str(tmp_path / "new.yaml")]) == 0
    assert [m["parameters"]["weight"] for m in yaml.safe_load((tmp_path / "new.yaml").read_text())["models"]] == [0.3, 0.4]


# ---------------------------------------------------------------- what mergekit-yaml reads, read the same (issue 27)
def _states(folders):
    return {n: transformers.LlamaForCausalLM.from_pretrained(folders / n).state_dict() for n in ("base", "code", "chat")}


def _by_hand(states, key, w_code, w_chat):
    base = states["base"][key]
    return base + w_code * (states["code"][key] - base) + w_chat * (states["chat"][key] - base)


def _check_merge(folders, recipe, expected):
    """The recipe's merge against mergekit's rule computed by hand: ``key -> (code's weight, chat's weight)``."""
    tv = recipe.task_vectors()
    merged = tv.merge(recipe.flat_coeffs, recipe.method, dtype=torch.float32, groups=recipe.groups)
    states = _states(folders)
    for key, (w_code, w_chat) in expected.items():
        torch.testing.assert_close(merged[key], _by_hand(states, key, w_code, w_chat), msg=key)
    return tv


def test_models_may_mix_weight_forms(folders):
    # mergekit-yaml reads each model's weight on its own: a gradient for one, filters for another
    gradient = [0.2, 0.5, 0.8]
    filters = [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}]
    recipe = parse_recipe(_recipe(folders, models=[{"model": str(folders / "code"), "parameters": {"weight": gradient}},
                                                   {"model": str(folders / "chat"), "parameters": {"weight": filters}}]))
    # 3 layers: t = l / 2, so the gradient gives 0.2, 0.5, 0.8 at layers 0, 1, 2 and 0.2 outside the layers (t = 0)
    tv = _check_merge(folders, recipe, {
        "model.layers.0.self_attn.q_proj.weight": (0.2, 0.3), "model.layers.1.self_attn.v_proj.weight": (0.5, 0.3),
        "model.layers.1.mlp.up_proj.weight": (0.5, 0.6), "model.layers.2.mlp.down_proj.weight": (0.8, 0.6),
        "model.layers.2.input_layernorm.weight": (0.8, 0.6), "model.embed_tokens.weight": (0.2, 0.6), "model.norm.weight": (0.2, 0.6)})
    emitted = tv.mergekit_config(recipe.flat_coeffs, recipe.method, recipe.groups)  # written back as it was read
    assert [m["parameters"]["weight"] for m in emitted["models"]] == [gradient, filters]
    np.testing.assert_allclose(parse_recipe(emitted).coeffs, recipe.coeffs)
    # a number beside filters: the same in every group
    mixed = parse_recipe(_recipe(folders, models=[{"model": str(folders / "code"), "parameters": {"weight": 0.7}},
                                                  {"model": str(folders / "chat"), "parameters": {"weight": filters}}]))
    np.testing.assert_allclose(mixed.coeffs, [[0.7, 0.7], [0.3, 0.6]])


def test_a_gradient_inside_a_filter_interpolates_over_the_models_depth(folders):
    # mergekit evaluates a filter's gradient at the tensor's t over the whole model (t = l / 2 here), not
    # over the layers the filter matches
    recipe = parse_recipe(_recipe(folders, models=[
        {"model": str(folders / "code"), "parameters": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]}},
        {"model": str(folders / "chat"), "parameters": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": [1.0, 0.0]}]}}]))
    assert recipe.groups == mm.Groups({"self_attn": "self_attn", "rest": ".*"}, knots=2)
    tv = _check_merge(folders, recipe, {
        "model.layers.0.self_attn.q_proj.weight": (0.0, 0.2), "model.layers.1.self_attn.o_proj.weight": (0.5, 0.2),
        "model.layers.2.self_attn.k_proj.weight": (1.0, 0.2), "model.layers.1.mlp.gate_proj.weight": (0.5, 0.5),
        "model.layers.2.mlp.up_proj.weight": (0.5, 0.0), "model.embed_tokens.weight": (0.5, 1.0), "model.norm.weight": (0.5, 1.0)})
    emitted = tv.mergekit_config(recipe.flat_coeffs, recipe.method, recipe.groups)
    assert [m["parameters"]["weight"] for m in emitted["models"]] == [
        [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}], [{"filter": "self_attn", "value": 0.2}, {"value": [1.0, 0.0]}]]
    np.testing.assert_allclose(parse_recipe(emitted).coeffs, recipe.coeffs)


def test_a_filter_gradient_normalised_with_a_varying_total_is_noted():
    weights = ([{"filter": "mlp", "value": [1.0, 3.0]}, {"value": 1.0}], [{"filter": "mlp", "value": 1.0}, {"value": [1.0, 1.0]}])
    assert any("normalize" in n for n in parse_recipe(_two("task_arithmetic", weights=weights, normalize=True)).notes)
    constant = ([{"filter": "mlp", "value": [1.0, 3.0]}, {"value": 1.0}], [{"filter": "mlp", "value": [3.0, 1.0]}, {"value": 2.0}])
    recipe = parse_recipe(_two("task_arithmetic", weights=constant, normalize=True))  # the total is 4 in mlp, 3 elsewhere: exact
    assert not recipe.notes
    np.testing.assert_allclose(recipe.coeffs, [[0.25, 0.75, 1 / 3, 1 / 3], [0.75, 0.25, 2 / 3, 2 / 3]])


def test_numeric_strings_are_read_as_numbers(tmp_path):
    # YAML 1.1 reads 1e-1 as the string '1e-1'; mergekit (pydantic) reads it as 0.1
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: breadcrumbs\nbase_model: /m/base\nparameters: {lambda: 5e-1}\nmodels:\n"
                    "  - model: /m/a\n    parameters: {weight: 1e-1, density: 5e-1, gamma: 1e-2}\n"
                    "  - model: /m/b\n    parameters: {weight: [1e-1, 0.5, 2e-1], density: 5e-1, gamma: 1e-2}\n")
    assert yaml.safe_load(path.read_text())["models"][0]["parameters"]["weight"] == "1e-1"
    recipe = mm.from_mergekit(path)
    np.testing.assert_allclose(recipe.coeffs, [[0.05, 0.05, 0.05], [0.05, 0.25, 0.1]])
    assert recipe.method == mm.Breadcrumbs(0.5, 0.01)
    filtered = parse_recipe(_two("task_arithmetic", weights=([{"filter": "mlp", "value": "1e-1"}, {"value": "2E-1"}], " .5 ")))
    np.testing.assert_allclose(filtered.coeffs, [[0.1, 0.2], [0.5, 0.5]])
    with pytest.raises(RecipeError, match=r"field 'weight' of /m/a must be .*the string 'a lot', which is not a number"):
        parse_recipe(_two("task_arithmetic", weights=("a lot", 0.5)))
    with pytest.raises(RecipeError, match=r"field 'weight' of /m/b: a gradient must be numbers: got the string 'x'"):
        parse_recipe(_two("task_arithmetic", weights=(0.5, ["1e-1", "x"])))
    with pytest.raises(RecipeError, match=r"field 'density' must be a number .*the string 'half'"):
        parse_recipe(_two("ties", weights=(1.0, 1.0), per_model={"density": "half"}))


def test_a_lora_recipe_says_it_needs_mergekits_lora_cache(folders, tmp_path):
    from map_merge.mergekit_config import recipe_yaml

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folders / "base"),
                               peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    tv = mm.TaskVectors.from_models(folders / "base", {"adapter": tmp_path / "adapter", "code": folders / "code"})
    config = tv.mergekit_config([0.5, 0.3])
    assert config["models"][0]["model"] == f"{(folders / 'base').resolve()}+{(tmp_path / 'adapter').resolve()}"
    text = recipe_yaml(config)
    assert text.startswith("#") and "--lora-merge-cache" in text.split("\n\n")[0] and "--lora-merge-dtype float32" in text
    assert yaml.safe_load(text) == config  # a comment, nothing else
    plain = recipe_yaml(mm.TaskVectors.from_models(folders / "base", [folders / "code"]).mergekit_config([0.5]))
    assert not plain.startswith("#") and "lora" not in plain


def test_cli_save_writes_the_lora_note_into_the_recipe(folders, tmp_path):
    import json

    from map_merge.cli import main

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folders / "base"),
                               peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    (tmp_path / "user.py").write_text(_EVAL)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"evaluator": "user.py:evaluate", "pretrained": str(folders / "base"),
                                  "finetuned": {"adapter": str(tmp_path / "adapter")}}))
    assert main(["save", "--config", str(config), "--coeffs", "0.5", "--out", str(tmp_path / "m"),
                 "--emit-mergekit", str(tmp_path / "recipe.yaml")]) == 0
    text = (tmp_path / "recipe.yaml").read_text()
    assert text.startswith("#") and "--lora-merge-cache" in text
    assert yaml.safe_load(text)["models"][0]["parameters"]["weight"] == 0.5


def test_a_run_config_carries_a_recipes_filter_gradients(folders, tmp_path):
    from map_merge.config import load_config, parse_groups

    weights = [[{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}], 0.6]
    config = _cli_setup(folders, tmp_path, _recipe(folders, models=[
        {"model": str(folders / n), "parameters": {"weight": w}} for n, w in zip(("code", "chat"), weights)]))
    loaded = load_config(config, mergekit=tmp_path / "recipe.yaml")
    groups = parse_groups(loaded["groups"])
    assert groups == loaded["_recipe"].groups and groups.names == ("mlp.knot0", "mlp.knot1", "rest.knot0", "rest.knot1")
    # per tensor: the mlp block's knots interpolated at t = l / 2, the rest block's elsewhere
    np.testing.assert_allclose(groups.weights(["model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                                               "model.norm.weight"]), [[0.5, 0.5, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert mm.Groups.from_spec(groups.spec) == groups


def _score_nothing(model):
    return 0.0


@pytest.mark.parametrize("groups, coeffs", [
    (mm.Groups({"attn": "self_attn", "feed_forward": r"\.mlp\.", "others": ".+"}), [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]),
    (mm.Groups({"attn": "self_attn", "rest": ".*"}, knots=2), [[0.1, 0.9, 0.2, 0.8], [0.3, 0.7, 0.4, 0.6]]),
])
def test_group_names_and_the_store_key_survive_a_recipe_round_trip(folders, tmp_path, groups, coeffs):
    """Groups named otherwise than their filters come back from the recipe map_merge wrote with
    their names and patterns, so a run from it keys the store as the run that wrote it."""
    from map_merge.mergekit_config import recipe_yaml

    models = {"code": str(folders / "code"), "chat": str(folders / "chat")}
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(emit_recipe(str(folders / "base"), models, np.array(coeffs), None, groups)))
    again = mm.from_mergekit(path)
    assert again.groups.names == groups.names and again.groups == groups and again.notes == []
    np.testing.assert_allclose(again.coeffs, coeffs)
    tv = again.task_vectors()
    model = transformers.LlamaForCausalLM.from_pretrained(folders / "base")
    keys = [mm.ModelObjective(model, tv, {"x": _score_nothing}, groups=g, progress=False).fingerprint() for g in (groups, again.groups)]
    assert keys[0] == keys[1]


def test_group_names_that_no_longer_fit_the_filters_are_let_go(folders):
    config = emit_recipe(str(folders / "base"), {"code": str(folders / "code"), "chat": str(folders / "chat")},
                         np.array([[0.1, 0.2], [0.3, 0.4]]), None, mm.Groups({"attn": "self_attn", "rest": ".*"}))
    for entry in config["models"]:  # edited by hand after map_merge wrote it
        entry["parameters"]["weight"][0]["filter"] = "mlp"
    again = parse_recipe(config)
    assert again.groups.names == ("mlp", "rest") and any("map_merge" in note for note in again.notes)
