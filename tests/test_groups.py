"""Coefficient groups against hand computations per group, on every storage; one group is exactly
the ungrouped merge."""

import json

import numpy as np
import pytest
import torch

import map_merge as mm
from map_merge import merge_methods
from map_merge.groups import as_matrix, coefficient_names

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATTN_MLP = {"attn": r"self_attn", "mlp": r"\.mlp\.", "rest": r".*"}


def test_regex_groups_first_match_wins_and_every_tensor_needs_one():
    groups = mm.Groups({"q": r"q_proj", "attn": r"self_attn", "rest": r".*"})
    w = groups.weights(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"])
    np.testing.assert_array_equal(w, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"tensor\(s\) \['model.norm.weight'\] \(1 in all\) match no group of \['attn'\]"):
        mm.Groups({"attn": "self_attn"}).weights(["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"])
    with pytest.raises(ValueError, match="not a regular expression"):
        mm.Groups({"bad": "("})
    assert coefficient_names(["a", "b"], groups) == ("a/q", "a/attn", "a/rest", "b/q", "b/attn", "b/rest")


def test_depth_knots_interpolate_like_a_mergekit_gradient():
    groups = mm.Groups.by_depth(knots=3)
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    w = groups.weights(keys)
    # layer l of 5 at t = l / 4, scaled onto 3 knots: t * 2 = 0, 0.5, 1, 1.5, 2; outside the layers t = 0
    np.testing.assert_allclose(w, [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1], [1, 0, 0], [1, 0, 0]])
    assert groups.names == ("knot0", "knot1", "knot2") and mm.Groups.from_spec(groups.spec) == groups
    assert as_matrix([1, 2, 3, 4, 5, 6], 2, groups).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match=r"expected 6 coefficients \(one per task and group: T x G = 2 x 3"):
        as_matrix([1, 2, 3], 2, groups)


def test_patterns_with_knots_give_each_pattern_its_own_gradient():
    # a mergekit filter whose value is a gradient: the first matching pattern picks the block, t = l / (L - 1) the knots
    groups = mm.Groups({"attn": "self_attn", "rest": ".*"}, knots=2)
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight",
            "model.layers.4.mlp.down_proj.weight", "model.embed_tokens.weight"]
    np.testing.assert_allclose(groups.weights(keys), [[1, 0, 0, 0], [0, 0, 0.75, 0.25], [0.5, 0.5, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert groups.names == ("attn.knot0", "attn.knot1", "rest.knot0", "rest.knot1") and groups.size == 4
    assert mm.Groups.from_spec(groups.spec) == groups and groups != mm.Groups.by_depth(2)
    with pytest.raises(ValueError, match="match no group"):
        mm.Groups({"attn": "self_attn"}, knots=2).weights(keys)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base", max_shard_size="10KB")
    for i in range(2):
        model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        model.save_pretrained(root / f"ft{i}", max_shard_size="10KB")
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    states = {name: {k: v.float() for k, v in transformers.LlamaForCausalLM.from_pretrained(root / name).state_dict().items()}
              for name in ("base", "ft0", "ft1")}
    merged = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"), root / "lora").merge_and_unload()
    states["lora"] = {k: v.detach().float() for k, v in merged.state_dict().items()}
    return root, states


@pytest.mark.parametrize("groups", [mm.Groups(ATTN_MLP), mm.Groups.by_depth(3)], ids=["attn-mlp", "depth"])
@pytest.mark.parametrize("storage", ["streamed", "dense", "lora"])
def test_grouped_merge_equals_a_hand_computation_per_group(llama, monkeypatch, groups, storage):
    monkeypatch.setattr(merge_methods, "CHUNK", 1000)
    root, states = llama
    sources = [root / "ft0", root / "lora"] if storage == "lora" else [root / "ft0", root / "ft1"]
    tasks = [states[p.name] for p in sources]
    tv = mm.TaskVectors.from_models(root / "base", sources, storage="dense" if storage == "dense" else "auto")
    coeffs = np.array([[0.9, 0.2, 0.5], [-0.3, 0.7, 0.1]])
    merged = tv.merge(coeffs.reshape(-1), dtype=torch.float32, groups=groups)  # task-major flat vector
    base = states["base"]
    keys = list(base)
    weights = groups.weights(keys)
    for key, w in zip(keys, weights):
        c = coeffs @ w  # this tensor's coefficient per task
        expected = base[key] + sum(ci * (t[key] - base[key]) for ci, t in zip(c, tasks))
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    live = tv.merge_into(transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32), coeffs, groups=groups)
    for key, value in live.state_dict().items():
        torch.testing.assert_close(value, merged[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("storage", ["streamed", "dense", "lora"])
def test_one_group_is_exactly_the_ungrouped_merge(llama, storage):
    root, _ = llama
    sources = [root / "ft0", root / "lora"] if storage == "lora" else [root / "ft0", root / "ft1"]
    tv = mm.TaskVectors.from_models(root / "base", sources, storage="auto" if storage == "lora" else storage)
    for method in (None, mm.Ties(k=0.3), mm.Dare(p=0.3, seed=2), mm.Breadcrumbs(0.6, 0.1), mm.Della(0.5, 0.2, seed=3)):
        plain = tv.merge([0.4, 0.8], method, dtype=torch.float32)
        for groups in (mm.Groups({"all": ".*"}), mm.Groups.by_depth(1)):
            grouped = tv.merge([0.4, 0.8], method, dtype=torch.float32, groups=groups)
            assert all(torch.equal(plain[k], grouped[k]) for k in plain)


def test_saved_grouped_merge_names_task_group_coefficients(llama, tmp_path):
    root, _ = llama
    tv = mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"])
    groups = mm.Groups(ATTN_MLP)
    folder = tv.save_merged(tmp_path / "m", np.arange(6) / 10, groups=groups)
    meta = json.loads((folder / "map_merge.json").read_text())
    assert meta["coefficients"] == {"task0/attn": 0.0, "task0/mlp": 0.1, "task0/rest": 0.2, "task1/attn": 0.3, "task1/mlp": 0.4,
                                    "task1/rest": 0.5}
    assert meta["groups"] == {"patterns": ATTN_MLP}
    reloaded = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    expected = tv.merge(np.arange(6) / 10, groups=groups)
    for key, value in reloaded.items():
        assert torch.equal(value, expected[key]), key


def test_objective_with_groups_merges_and_names_task_group(llama):
    root, states = llama
    tv = mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"], storage="dense")
    groups = mm.Groups(ATTN_MLP)
    probe = "model.layers.1.mlp.up_proj.weight"
    objective = mm.ModelObjective(transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32), tv,
                                  {"up": lambda m: float(m.state_dict()[probe].sum())}, groups=groups, progress=False)
    assert objective.num_coeffs == 6 and objective.coeff_names[:3] == ("task0/attn", "task0/mlp", "task0/rest")
    c = np.array([0.1, 0.7, 0.3, -0.2, 0.4, 0.9])
    value = objective(c[None])[0, 0]
    base, a, b = (states[n][probe] for n in ("base", "ft0", "ft1"))
    assert value == pytest.approx(float((base + 0.7 * (a - base) + 0.4 * (b - base)).sum()), rel=1e-5)  # the mlp group's
    plain = mm.ModelObjective(transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32), tv,
                              {"up": lambda m: 0.0}, progress=False)
    assert plain.fingerprint() != objective.fingerprint() and plain.coeff_names == ("task0", "task1")
    with pytest.raises(ValueError, match="match no group"):
        mm.ModelObjective(transformers.LlamaForCausalLM.from_pretrained(root / "base"), tv, {"up": lambda m: 0.0},
                          groups=mm.Groups({"attn": "self_attn"}))


def test_nested_merging_with_groups_recovers_the_analytic_optimum():
    # T = 2 tasks, G = 2 groups: one stage scales each member's groups, so it searches all four
    # coefficients; each task's metric is exactly quadratic, the equal-preference optimum their midpoint
    targets = np.array([[0.8, 0.2, 0.1, 0.3], [0.2, 0.6, 0.7, 0.9]])

    def fn(c):
        c = np.atleast_2d(c)
        return np.stack([1 - ((c - t) ** 2).sum(1) for t in targets], 1)

    full = mm.FunctionObjective(fn, 4, ["a", "b"])

    def objective_for(idx):
        return mm.FunctionObjective(lambda c: fn(c)[:, idx], 4, [["a", "b"][i] for i in idx], links=["identity"] * len(idx))

    result = mm.nested_merge(objective_for, 2, [1, 1], samples_per_stage=30, num_groups=2, seed=0)
    assert result.coeffs.shape == (4,) and result.stages[0].choice.shape == (4,)
    np.testing.assert_allclose(result.coeffs, targets.mean(0), atol=0.05)
    np.testing.assert_allclose(result.metrics, full(result.coeffs[None])[0])


def test_a_group_owning_no_tensor_is_an_error(llama):
    """Patterns match checkpoint names; one that owns nothing (a live name of a renamed tensor, a
    typo, a group shadowed by an earlier one) would give coefficients that change nothing."""
    root, _ = llama
    tv = mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"])
    for patterns, empty in [({"experts": r"mlp\.experts", "rest": ".*"}, "experts"), ({"all": ".*", "attn": "self_attn"}, "attn")]:
        with pytest.raises(ValueError, match=rf"group\(s\) \['{empty}'\] own no merged tensor .*e\.g\. 'model\.layers\."):
            tv.merge([0.1] * 4, groups=mm.Groups(patterns))
    assert tv.merge([0.1, 0.1, 0.2, 0.2], groups=mm.Groups({"attn": "self_attn", "rest": ".*"}))  # each group owns something


def test_dense_merge_uses_each_groups_own_coefficient_however_close(llama):
    # coefficients within allclose's tolerance of each other are still different coefficients
    root, states = llama
    tv = mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"], dtype=torch.float64, storage="dense")
    groups = mm.Groups({"attn": "self_attn", "rest": ".*"})
    coeffs = np.array([[0.5, 0.5 + 2e-6], [0.25, 0.25]])
    merged = tv.merge(coeffs, groups=groups)
    key = "model.layers.1.mlp.up_proj.weight"  # 'rest'
    base = states["base"][key].double()
    expected = base + (0.5 + 2e-6) * (states["ft0"][key].double() - base) + 0.25 * (states["ft1"][key].double() - base)
    torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-12)


def test_objective_refuses_a_group_owning_nothing_when_built(llama):
    root, _ = llama
    tv = mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"])
    with pytest.raises(ValueError, match=r"group\(s\) \['experts'\] own no merged tensor"):
        mm.ModelObjective(transformers.LlamaForCausalLM.from_pretrained(root / "base"), tv, {"up": lambda m: 0.0},
                          groups=mm.Groups({"experts": r"mlp\.experts", "rest": ".*"}))


def test_nested_merging_refuses_coefficients_that_are_no_whole_number_of_groups():
    objective = mm.FunctionObjective(lambda c: np.atleast_2d(c)[:, :2], 3, ["a", "b"])
    with pytest.raises(ValueError, match="3 coefficients for 2 tasks"):
        mm.nested_merge(lambda idx: objective, 2, [1, 1], samples_per_stage=10)
