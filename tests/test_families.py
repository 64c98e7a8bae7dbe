"""Real checkpoint families through every storage, against independent ground truth.

For each family (tiny configs written as sharded safetensors folders by ``save_pretrained``):
``merge_into`` a live model equals ``from_pretrained`` of ``save_merged``'s folder equals a hand
computation from the fine-tuned models as transformers loads them; ``num_params`` is the same
for every storage. Families: Llama (untied), GPT-2 (tied, Conv1D), Mixtral (fused experts),
Qwen2-MoE (fused experts, shared expert), BERT (tied decoder, prefix), Qwen2 (tied embeddings).
"""

import copy

import pytest
import torch

import map_merge as mm

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def family(name):
    """``(model class, config, LoRA target modules, dtype)`` of a tiny member of the family."""
    if name == "llama":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL, tie_word_embeddings=False), ["q_proj", "up_proj"], torch.bfloat16
    if name == "gpt2":
        return (transformers.GPT2LMHeadModel, transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                                      bos_token_id=0, eos_token_id=0), ["c_attn", "c_fc"], torch.float32)
    if name == "mixtral":
        return (transformers.MixtralForCausalLM, transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
                ["q_proj", "v_proj"], torch.bfloat16)
    if name == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                             shared_expert_intermediate_size=12)
        return transformers.Qwen2MoeForCausalLM, config, ["k_proj", "o_proj"], torch.float32
    if name == "bert":
        config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                         max_position_embeddings=32)
        return transformers.BertForMaskedLM, config, ["query", "value"], torch.float32
    if name == "qwen2_tied":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**SMALL, tie_word_embeddings=True), ["q_proj", "down_proj"], torch.bfloat16
    raise KeyError(name)


FAMILIES = ["llama", "gpt2", "mixtral", "qwen2_moe", "bert", "qwen2_tied"]


def perturb(model, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=generator)).to(p.dtype))
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoints(request, tmp_path_factory):
    """A base, two full fine-tunes (sharded folders in the family's dtype) and a LoRA adapter."""
    name = request.param
    cls, config, targets, dtype = family(name)
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    base = cls(config).to(dtype)
    base.save_pretrained(root / "base", max_shard_size="10KB")
    for i in range(2):
        perturb(cls.from_pretrained(root / "base"), seed=i + 1).save_pretrained(root / f"ft{i}", max_shard_size="12KB")
    torch.manual_seed(3)
    lora = peft.get_peft_model(cls.from_pretrained(root / "base", dtype=torch.float32),
                               peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                                               fan_in_fan_out=name == "gpt2"))
    lora.save_pretrained(root / "lora")
    return name, cls, dtype, root


def live_state(cls, path, dtype=torch.float32):
    return {k: v.detach().clone() for k, v in cls.from_pretrained(path, dtype=dtype).state_dict().items()}


def lora_state(cls, root):
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(root / "base", dtype=torch.float32), root / "lora").merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_within_ulp(actual, expected, key):
    """Equal up to one rounding of the actual tensor's dtype (merged in fp32, rounded once)."""
    eps = torch.finfo(actual.dtype).eps
    tolerance = eps * expected.abs() + 1e-6
    bad = ((actual.float() - expected).abs() > tolerance).sum()
    assert int(bad) == 0, f"{key}: {int(bad)} elements off by more than one {actual.dtype} rounding"


def test_every_storage_agrees_with_from_pretrained_and_a_hand_merge(checkpoints, tmp_path):
    name, cls, dtype, root = checkpoints
    base_live = live_state(cls, root / "base")
    fts = [live_state(cls, root / f"ft{i}") for i in range(2)]
    adapter = lora_state(cls, root)
    base_module = cls.from_pretrained(root / "base")
    ft_modules = [cls.from_pretrained(root / f"ft{i}") for i in range(2)]
    runs = {
        "streamed": (mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"]), [fts[0], fts[1]]),
        "dense (folders)": (mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "ft1"], storage="dense"), [fts[0], fts[1]]),
        "dense (modules)": (mm.TaskVectors.from_models(base_module, ft_modules), [fts[0], fts[1]]),
        "lora": (mm.TaskVectors.from_models(root / "base", [root / "lora"]), [adapter]),
        "lora (module)": (mm.TaskVectors.from_models(base_module, [root / "lora"]), [adapter]),
        "mixed": (mm.TaskVectors.from_models(root / "base", [root / "ft0", root / "lora"]), [fts[0], adapter]),
    }
    assert runs["streamed"][0].storage == "streamed" and runs["lora"][0].storage == "lora" and runs["mixed"][0].storage == "mixed"
    assert runs["lora (module)"][0].storage == "lora" and runs["dense (modules)"][0].storage == "dense"
    counts = {label: tv.num_params for label, (tv, _) in runs.items()}
    assert len(set(counts.values())) == 1, counts  # tied weights once, fused experts by their checkpoint tensors
    assert counts["streamed"] == sum(p.numel() for p in base_module.parameters())  # parameters() lists a tied tensor once
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2]])
    for label, (tv, tasks) in runs.items():
        c = [0.7, -0.4][: len(tasks)]
        live = tv.merge_into(cls.from_pretrained(root / "base"), c)
        state = live.state_dict()
        for key, value in base_live.items():
            if not value.dtype.is_floating_point:
                assert torch.equal(state[key], value), (label, key)
                continue
            expected = value + sum(ci * (t[key] - value) for ci, t in zip(c, tasks))
            assert state[key].dtype == dtype, (label, key)
            assert_within_ulp(state[key], expected, f"{name}/{label}: {key}")
        folder = tv.save_merged(tmp_path / label.replace(" ", "_"), c, max_shard_size="10KB")
        assert (folder / "config.json").exists() and (folder / "map_merge.json").exists(), label
        reloaded = cls.from_pretrained(folder)
        for key, value in reloaded.state_dict().items():
            assert torch.equal(value, state[key]), (label, key)  # the saved folder is the live merge, bit for bit
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, live(tokens).logits), label


def test_fused_experts_are_written_through_transformers_conversion(tmp_path):
    """Mixtral's per-expert files become stacked live tensors; a merge moves each expert's slice."""
    cls, config, _, _ = family("mixtral")
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    perturb(cls.from_pretrained(tmp_path / "base"), 1).save_pretrained(tmp_path / "ft")
    tv = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "ft"])
    assert any(".experts.0.w1.weight" in k for k in tv.keys)  # checkpoint layout
    model = tv.merge_into(cls.from_pretrained(tmp_path / "base"), [1.0])
    ft = cls.from_pretrained(tmp_path / "ft")
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert fused in model.state_dict()
    torch.testing.assert_close(model.state_dict()[fused], ft.state_dict()[fused], rtol=0, atol=0)


def test_tied_weights_are_one_tensor_everywhere(tmp_path):
    cls, config, targets, _ = family("gpt2")
    torch.manual_seed(0)
    base = cls(config)
    base.save_pretrained(tmp_path / "base")
    ft = perturb(copy.deepcopy(base), 1)
    # dense storage from folders merged into a live tied GPT-2 (was: unexpected keys ['lm_head.weight'])
    tv = mm.TaskVectors.from_models(tmp_path / "base", [ft], storage="dense")
    model = tv.merge_into(cls.from_pretrained(tmp_path / "base"), [1.0])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, ft.transformer.wte.weight)
    # LoRA over an in-memory tied module: the tied tensor counted once, saved once, config written
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=targets, fan_in_fan_out=True, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    over_module = mm.TaskVectors.from_models(base, [tmp_path / "lora"])
    assert over_module.num_params == sum(p.numel() for p in base.parameters())
    assert "lm_head.weight" not in over_module.keys
    folder = over_module.save_merged(tmp_path / "merged", [0.5])
    assert (folder / "config.json").exists() and (folder / "generation_config.json").exists()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    reloaded = cls.from_pretrained(folder)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    expected = base.transformer.wte.weight + 0.5 * (lora.merge_and_unload().transformer.wte.weight - base.transformer.wte.weight)
    torch.testing.assert_close(reloaded.transformer.wte.weight, expected)


def test_adapter_saved_without_peft_prefix_maps_alike(tmp_path):
    """transformers' own adapter saving (``save_peft_format=False``) writes keys without ``base_model.model.``."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    cls, config, targets, _ = family("llama")
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(cls.from_pretrained(tmp_path / "base"), peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "peft")
    shutil.copytree(tmp_path / "peft", tmp_path / "bare")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in tensors)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(tmp_path / "bare" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "bare" / "adapter_config.json").read_text())["r"] == 2
    a = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "peft"]).merge([0.8], dtype=torch.float32)
    b = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "bare"]).merge([0.8], dtype=torch.float32)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_bf16_storage_works_end_to_end(tmp_path):
    cls, config, _, _ = family("llama")
    torch.manual_seed(0)
    base = cls(config).to(torch.bfloat16)
    fts = [perturb(copy.deepcopy(base), i + 1) for i in range(2)]
    tv = mm.TaskVectors.from_models(base, fts, dtype=torch.bfloat16, storage="dense")
    assert tv.dtype == torch.bfloat16 and len(tv.fingerprint()) == 32  # was: unsupported ScalarType BFloat16
    other = mm.TaskVectors.from_models(base, [fts[1], fts[0]], dtype=torch.bfloat16, storage="dense")
    assert other.fingerprint() != tv.fingerprint()
    folder = tv.save_merged(tmp_path / "merged", [0.5, 0.5])
    objective = mm.ModelObjective(copy.deepcopy(base), tv, {"norm": lambda m: float(m.model.norm.weight.float().sum())},
                                  store=mm.EvaluationStore(tmp_path / "e.sqlite"), progress=False)
    value = objective([[0.5, 0.5]])[0, 0]
    assert value == pytest.approx(float(cls.from_pretrained(folder).model.norm.weight.float().sum()), rel=1e-3)


def test_meta_parameters_get_an_error_naming_them():
    cls, config, _, _ = family("llama")
    torch.manual_seed(0)
    base = cls(config)
    with torch.device("meta"):
        offloaded = cls(config)
    with pytest.raises(ValueError, match=r"parameter 'model\.embed_tokens\.weight' .* meta device"):
        mm.TaskVectors.from_models(offloaded, [base])
    for storage in ("dense", "streamed"):
        tv = mm.TaskVectors.from_models(base, [perturb(copy.deepcopy(base), 1)], storage=storage)
        with pytest.raises(ValueError, match=r"meta device"):
            tv.merge_into(offloaded, [1.0])


def test_live_deltas_and_pwe_moe_see_fused_and_renamed_tensors(tmp_path):
    from map_merge.moe import ParetoMoE

    cls, config, _, _ = family("mixtral")
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    for i in range(2):
        perturb(cls.from_pretrained(tmp_path / "base"), i + 1).save_pretrained(tmp_path / f"ft{i}")
    tv = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"])
    model = cls.from_pretrained(tmp_path / "base")
    keys = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj", "model.layers.0.mlp.gate.weight"]
    found = tv.live_deltas(model, keys)
    base = model.state_dict()
    for i in range(2):
        ft = cls.from_pretrained(tmp_path / f"ft{i}", dtype=torch.float32).state_dict()
        for key in keys:
            torch.testing.assert_close(found[key][0], base[key].float())
            torch.testing.assert_close(found[key][1][i], ft[key] - base[key].float())
    moe = ParetoMoE(model, tv, upcycle=r"mlp\.experts$")
    assert sorted(moe.groups) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert set(moe.groups["model.layers.0.mlp.experts"]) == {"model.layers.0.mlp.experts.gate_up_proj",
                                                             "model.layers.0.mlp.experts.down_proj"}


def test_a_bare_base_model_takes_the_merge_without_the_head(tmp_path):
    """``AutoModel`` (the command line's default live model with an evaluator) over a
    ``LlamaForCausalLM`` checkpoint: the renamed body is merged, the head it lacks is left out
    (was: "unexpected keys ['lm_head.weight']")."""
    cls, config, _, _ = family("llama")
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    perturb(cls.from_pretrained(tmp_path / "base"), 1).save_pretrained(tmp_path / "ft")
    base = cls.from_pretrained(tmp_path / "base").model.state_dict()
    ft = cls.from_pretrained(tmp_path / "ft").model.state_dict()
    for storage in ("streamed", "dense"):
        tv = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "ft"], storage=storage)
        bare = tv.merge_into(transformers.AutoModel.from_pretrained(tmp_path / "base"), [0.5])
        assert type(bare) is transformers.LlamaModel
        state = bare.state_dict()
        assert set(state) == set(ft)
        for key, value in ft.items():
            torch.testing.assert_close(state[key], base[key] + 0.5 * (value - base[key]), msg=f"{storage}: {key}")
    with pytest.raises(ValueError, match=r"unexpected keys \['lm_head.weight'\]"):  # a model with its own head still must match
        mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "ft"]).merge_into(
            transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**SMALL, num_labels=2)), [0.5])


def _peft_merge(cls, base, adapter, scale=1.0):
    """The base folder with ``scale`` times the adapter's update, as PEFT itself merges it."""
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base), adapter).merge_and_unload()
    ref = cls.from_pretrained(base).state_dict()
    return {k: ref[k] + scale * (v - ref[k]) if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}


def test_adapters_over_a_folder_are_placed_by_its_architecture(tmp_path):
    """Over a pretrained folder the adapter plan comes from a meta-device skeleton (was: refused as
    "on the meta device" and silently dropped, so renamed and tied modules were not found): PEFT's
    per-layer transposition (Conv1D always, Linear never, whatever ``fan_in_fan_out`` the config
    saved), renamed modules saved whole (Mixtral's router), exported under the names PEFT loads."""
    cls, config, _, _ = family("gpt2")
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "gpt2")
    lora = peft.get_peft_model(cls.from_pretrained(tmp_path / "gpt2"),
                               peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["attn.c_proj", "lm_head"]))
    lora.save_pretrained(tmp_path / "gpt2-lora")  # PEFT saves fan_in_fan_out=False: the config of the last layer made
    tv = mm.TaskVectors.from_models(tmp_path / "gpt2", [tmp_path / "gpt2-lora"])
    live = tv.merge_into(cls.from_pretrained(tmp_path / "gpt2"), [0.5]).state_dict()
    expected = _peft_merge(cls, tmp_path / "gpt2", tmp_path / "gpt2-lora", 0.5)
    for key, value in expected.items():  # attn.c_proj is a square Conv1D: a wrong transposition fits its shape
        torch.testing.assert_close(live[key], value, msg=key)
    exported = tv.save_merged_adapter(tmp_path / "gpt2-merged", [0.5])
    for key, value in _peft_merge(cls, tmp_path / "gpt2", exported).items():
        torch.testing.assert_close(live[key], value, msg=key)
    # saving a tied module whole unties it in PEFT: refused, naming the modules
    whole = peft.get_peft_model(cls.from_pretrained(tmp_path / "gpt2"),
                                peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    whole.save_pretrained(tmp_path / "gpt2-head")
    with pytest.raises(ValueError, match=r"saves \['lm_head.weight'\] whole \(modules_to_save\), which PEFT unties from the tied \['transformer.wte.weight'\]"):
        mm.TaskVectors.from_models(tmp_path / "gpt2", [tmp_path / "gpt2-head"])

    cls, config, _, _ = family("mixtral")
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "mixtral")
    router = peft.get_peft_model(cls.from_pretrained(tmp_path / "mixtral"),
                                 peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"], modules_to_save=["model.layers.0.mlp.gate"]))
    with torch.no_grad():
        for name, p in router.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    router.save_pretrained(tmp_path / "mixtral-lora")
    tv = mm.TaskVectors.from_models(tmp_path / "mixtral", [tmp_path / "mixtral-lora"])
    assert "model.layers.0.block_sparse_moe.gate.weight" in tv.keys  # the checkpoint's name of the live mlp.gate
    live = tv.merge_into(cls.from_pretrained(tmp_path / "mixtral"), [1.0]).state_dict()
    expected = _peft_merge(cls, tmp_path / "mixtral", tmp_path / "mixtral-lora")
    assert not torch.equal(expected["model.layers.0.mlp.gate.weight"], cls.from_pretrained(tmp_path / "mixtral").state_dict()["model.layers.0.mlp.gate.weight"])
    for key, value in expected.items():
        torch.testing.assert_close(live[key], value, msg=key)
    exported = tv.save_merged_adapter(tmp_path / "mixtral-merged", [1.0])
    for key, value in _peft_merge(cls, tmp_path / "mixtral", exported).items():
        torch.testing.assert_close(live[key], value, msg=key)
