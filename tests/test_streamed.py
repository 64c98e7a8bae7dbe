"""Streamed and LoRA task vectors against independent ground truth: the dense storage, hand
formulas, torch.kthvalue, peft's merge_and_unload, and from_pretrained of a saved folder."""

import json

import pytest
import torch

import map_merge as mm
from map_merge import merge_methods

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama_config(hidden=16, vocab=48):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                    tie_word_embeddings=False)


def perturbed(model, seed, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))
    return model


@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory):
    """A bf16 Llama base and three full fine-tunes as sharded safetensors folders."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="4KB")
    paths = []
    for i in range(3):
        ft = perturbed(transformers.LlamaForCausalLM.from_pretrained(root / "base"), seed=i + 1)
        ft.save_pretrained(root / f"ft{i}", max_shard_size="6KB")
        paths.append(root / f"ft{i}")
    return root, root / "base", paths


def load(path, dtype=torch.bfloat16):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1000 elements, so every tensor is cut and DARE blocks / TIES passes span chunks."""
    monkeypatch.setattr(merge_methods, "CHUNK", 1000)


def test_storage_is_chosen_by_input_and_shown(llama_zoo):
    _, base, fts = llama_zoo
    streamed = mm.TaskVectors.from_models(base, fts)
    assert streamed.storage == "streamed" and "storage='streamed'" in repr(streamed)
    assert len(list(base.glob("*.safetensors"))) > 1  # a sharded folder
    dense = mm.TaskVectors.from_models(base, fts, storage="dense")
    assert dense.storage == "dense"
    assert streamed.num_params == dense.num_params == sum(p.numel() for p in load(base).parameters())
    with pytest.raises(ValueError, match="storage must be one of"):
        mm.TaskVectors.from_models(base, fts, storage="magic")


NEW_OPERATORS = [mm.Breadcrumbs(density=0.6, gamma=0.1),
                 mm.Breadcrumbs(density=0.5, gamma=0.05, scope="global", rescale="l1", consensus="sum", normalize=True),
                 mm.Della(density=0.6, epsilon=0.2, seed=2),
                 mm.Della(density=0.5, epsilon=0.1, seed=1, scope="global", rescale="inverse", consensus=None, normalize=False)]
NEW_IDS = ["breadcrumbs", "breadcrumbs-global-ties", "della", "della-global-linear"]


@pytest.mark.parametrize("method", [None, mm.Ties(k=0.3), mm.Ties(k=0.2, scope="tensor"), mm.Dare(p=0.4, seed=3),
                                    mm.Dare(p=0.3, seed=1, ties=mm.Ties(k=0.5))] + NEW_OPERATORS,
                         ids=["ta", "ties", "ties-tensor", "dare", "dare-ties"] + NEW_IDS)
def test_streamed_equals_dense(llama_zoo, small_chunks, method):
    _, base, fts = llama_zoo
    streamed = mm.TaskVectors.from_models(base, fts)
    dense = mm.TaskVectors.from_models(base, fts, storage="dense")
    c = [0.7, -0.3, 1.2]
    a, b = streamed.merge(c, method, dtype=torch.float32), dense.merge(c, method)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_task_arithmetic_hand_computed_from_the_files(llama_zoo):
    _, base, fts = llama_zoo
    tv = mm.TaskVectors.from_models(base, fts)
    c = [0.5, 0.25, -1.0]
    merged = tv.merge(c, dtype=torch.float32)
    b = load(base, torch.float32).state_dict()
    models = [load(p, torch.float32).state_dict() for p in fts]
    for key in ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]:
        expected = b[key] + sum(ci * (m[key] - b[key]) for ci, m in zip(c, models))
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)


def test_radix_select_equals_kthvalue():
    torch.manual_seed(0)
    data = torch.randn(3, 5000)
    data[1, :2000] = 0.5  # many ties
    data[2] = data[2].round(decimals=1)
    for keep in [1, 7, 2500, 4999, 5000]:
        exact = data.abs().kthvalue(data.shape[1] - keep + 1, dim=1).values
        passes = lambda: iter(data.split(333, dim=1))  # noqa: E731
        got = merge_methods.kth_largest_magnitude(passes, torch.full((3,), keep))
        assert torch.equal(got, exact), keep


def test_ties_global_trims_by_the_whole_model_threshold(llama_zoo, small_chunks):
    _, base, fts = llama_zoo
    tv = mm.TaskVectors.from_models(base, fts)
    dense = mm.TaskVectors.from_models(base, fts, storage="dense")
    vectors = dense.vectors
    keep = int(0.1 * vectors.shape[1])
    threshold = vectors.abs().kthvalue(vectors.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(vectors.abs() >= threshold, vectors, torch.zeros(()))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    expected = dense.base + (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1) * 0.8  # every c_i = 0.8
    got = tv.merge([0.8] * 3, mm.Ties(k=0.1), dtype=torch.float32)
    flat = torch.cat([got[k].reshape(-1) for k in dense.keys])
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-6)


def test_bf16_model_stays_bf16_and_cuda_free(llama_zoo):
    _, base, fts = llama_zoo
    c = [0.3, 0.6, 0.1]
    for storage in ("streamed", "dense"):
        tv = mm.TaskVectors.from_models(base, fts, storage=storage)
        model = load(base)
        tv.merge_into(model, c)
        expected = tv.merge(c)
        for key, value in model.state_dict().items():
            assert value.dtype == torch.bfloat16, (storage, key)
            assert torch.equal(value, expected[key].to(torch.bfloat16)), (storage, key)
        ptr = model.model.layers[0].mlp.up_proj.weight.data_ptr()
        tv.merge_into(model, [0.0, 0.0, 0.0])  # back to the base, in place
        assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == ptr
        assert torch.equal(model.model.layers[0].mlp.up_proj.weight, load(base).model.layers[0].mlp.up_proj.weight)


def test_saved_folder_round_trips_through_from_pretrained(llama_zoo, tmp_path):
    _, base, fts = llama_zoo
    tv = mm.TaskVectors.from_models(base, fts)
    c = [0.4, 0.4, 0.2]
    folder = tv.save_merged(tmp_path / "merged", c, max_shard_size="5KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (folder / "config.json").exists()
    meta = json.loads((folder / "map_merge.json").read_text())
    assert meta["coefficients"] == {"task0": 0.4, "task1": 0.4, "task2": 0.2} and meta["storage"] == "streamed"
    reloaded = load(folder)
    live = tv.merge_into(load(base), c)
    tokens = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, live(tokens).logits, rtol=0, atol=0)
    single = tv.save_merged(tmp_path / "one.safetensors", c)
    again = mm.TaskVectors.from_models(base, [single], names=["m"]).merge([1.0])
    for key, value in tv.merge(c).items():
        assert value.dtype == torch.bfloat16, key  # merge() keeps the checkpoint's dtype
        torch.testing.assert_close(again[key], value)


def test_bad_inputs_name_the_file_and_key(llama_zoo, tmp_path):
    import shutil

    root, base, fts = llama_zoo
    # a shard listed in the index is missing
    broken = tmp_path / "broken"
    shutil.copytree(fts[0], broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{shard.name}.*holding"):
        mm.TaskVectors.from_models(base, [broken])
    # a key missing in one fine-tune
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load(fts[1]).state_dict().items() if k != "model.norm.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"fine-tuned model 'b' .*short.safetensors.*missing keys \['model.norm.weight'\]"):
        mm.TaskVectors.from_models(base, {"a": fts[0], "b": tmp_path / "short.safetensors"})
    # a shape mismatch
    state = load(fts[1]).state_dict()
    state["model.norm.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.norm.weight'.*shape.safetensors"):
        mm.TaskVectors.from_models(base, [tmp_path / "shape.safetensors"])
    # NaN inside a shard: named at merge time and by validate()
    nan_dir = tmp_path / "nan"
    shutil.copytree(fts[2], nan_dir)
    index = json.loads((nan_dir / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = nan_dir / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key][2, 3] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    tv = mm.TaskVectors.from_models(base, [fts[0], nan_dir])
    with pytest.raises(ValueError, match=rf"'{key}' of fine-tuned model 'task1' \(.*{shard.name}\) has NaN"):
        tv.merge([0.5, 0.5])
    with pytest.raises(ValueError, match=rf"'{key}' of fine-tuned model 'task1' \(.*{shard.name}\) has NaN"):
        tv.validate()
    tv.merge([1.0, 0.0])  # a zero coefficient reads nothing of that model


# ---------------------------------------------------------------------- LoRA
def make_adapter(base_path, folder, seed, **config):
    torch.manual_seed(seed)
    model = load(base_path, torch.float32)
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    options.update(config)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**options))
    peft_model.save_pretrained(folder)
    merged = peft.PeftModel.from_pretrained(load(base_path, torch.float32), folder).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def adapters(llama_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    _, base, _ = llama_zoo
    out = {
        "plain": make_adapter(base, root / "plain", 1),
        "rslora": make_adapter(base, root / "rslora", 2, r=8, lora_alpha=4, use_rslora=True,
                               target_modules=["k_proj", "down_proj", "embed_tokens"],
                               rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 16}),
        "save": make_adapter(base, root / "save", 3, modules_to_save=["lm_head"]),
    }
    return root, out


def test_lora_task_vectors_equal_peft_merge_and_unload(llama_zoo, adapters):
    _, base, _ = llama_zoo
    root, merged = adapters
    names = list(merged)
    tv = mm.TaskVectors.from_models(base, {n: root / n for n in names})
    assert tv.storage == "lora"
    for i, name in enumerate(names):
        c = [0.0] * len(names)
        c[i] = 1.0
        ours = tv.merge(c, dtype=torch.float32)
        for key, value in merged[name].items():
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")


def test_mixed_lora_and_full_finetunes(llama_zoo, adapters, small_chunks):
    _, base, fts = llama_zoo
    root, merged = adapters
    tv = mm.TaskVectors.from_models(base, {"full": fts[0], "lora": root / "rslora", "save": root / "save"})
    assert tv.storage == "mixed"
    b = load(base, torch.float32).state_dict()
    full = load(fts[0], torch.float32).state_dict()
    c = [0.6, 1.5, -0.4]
    ours = tv.merge(c, dtype=torch.float32)
    for key in b:
        expected = b[key] + c[0] * (full[key] - b[key]) + c[1] * (merged["rslora"][key] - b[key]) + c[2] * (merged["save"][key] - b[key])
        torch.testing.assert_close(ours[key], expected, rtol=1e-5, atol=1e-5, msg=key)
    # TIES over adapters densifies per chunk: same as the dense storage built from the same inputs
    dense = mm.TaskVectors.from_models(base, {"full": fts[0], "lora": root / "rslora", "save": root / "save"}, storage="dense")
    assert dense.storage == "dense"
    a, d = tv.merge(c, mm.Ties(k=0.3), dtype=torch.float32), dense.merge(c, mm.Ties(k=0.3))
    for key in a:
        torch.testing.assert_close(a[key], d[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", NEW_OPERATORS, ids=NEW_IDS)
def test_new_operators_on_lora_storage_equal_dense(llama_zoo, adapters, monkeypatch, method):
    # chunks of 24 entries: rows of 16 stay whole, rows of 32 and 48 (Della) are cut and ranked in fit
    monkeypatch.setattr(merge_methods, "CHUNK", 24)
    _, base, _ = llama_zoo
    root, _ = adapters
    sources = {n: root / n for n in ["plain", "rslora", "save"]}
    lora = mm.TaskVectors.from_models(base, sources)
    dense = mm.TaskVectors.from_models(base, sources, storage="dense")
    assert lora.storage == "lora" and dense.storage == "dense"
    c = [0.9, -0.4, 0.6]
    a, b = lora.merge(c, method, dtype=torch.float32), dense.merge(c, method)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the prepared vectors do not depend on the chunking: the dense merge with whole-tensor chunks
    monkeypatch.setattr(merge_methods, "CHUNK", 1 << 20)
    whole = mm.TaskVectors.from_models(base, sources, storage="dense").merge(c, method)
    for key in a:
        torch.testing.assert_close(whole[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


class WideNet(torch.nn.Module):
    """Tensors of thousands of entries, so a chunk is cut into several tiles."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(300, 40)
        self.head = torch.nn.Linear(40, 130)


@pytest.mark.parametrize("method", [mm.Dare(p=0.4, seed=3), mm.Ties(k=0.3), NEW_OPERATORS[1]], ids=["dare", "ties", "breadcrumbs"])
def test_tiles_of_a_chunk_equal_the_dense_merge(tmp_path, monkeypatch, method):
    # chunks of up to 5000 entries cut into tiles of 1024 columns (not whole rows): deltas,
    # operator and sum tile by tile, over a full fine-tune and an adapter at once
    from safetensors.torch import save_file

    from map_merge.merge_methods import base as operators

    monkeypatch.setattr(merge_methods, "CHUNK", 5000)
    monkeypatch.setattr(operators, "TILE_ELEMENTS", 3000)
    torch.manual_seed(0)
    base = WideNet()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in perturbed(WideNet(), 1).state_dict().items()}, str(tmp_path / "ft.safetensors"))
    lora = peft.get_peft_model(_copy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    sources = {"full": tmp_path / "ft.safetensors", "lora": tmp_path / "lora", "again": tmp_path / "ft.safetensors"}
    streamed = mm.TaskVectors.from_models(tmp_path / "base.safetensors", sources)
    dense = mm.TaskVectors.from_models(tmp_path / "base.safetensors", sources, storage="dense")
    assert streamed.storage == "mixed" and max(merge_methods.tile_columns(3), 1024) < 40 * 300
    c = [0.5, -0.7, 1.1]
    a, b = streamed.merge(c, method), dense.merge(c, method)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lora_on_a_model_in_memory_and_gpt2_conv1d(tmp_path):
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.get_peft_model(_copy(base),
                               peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                               init_lora_weights=False))
    lora.save_pretrained(tmp_path / "gpt2-lora")
    reference = lora.merge_and_unload().state_dict()
    tv = mm.TaskVectors.from_models(base, [tmp_path / "gpt2-lora"])
    assert tv.storage == "lora"
    model = _copy(base)
    tv.merge_into(model, [1.0])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5, msg=key)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_adapter_for_another_base_is_refused(llama_zoo, tmp_path):
    _, base, _ = llama_zoo
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(tiny_llama_config(hidden=24))
    other.save_pretrained(tmp_path / "other")
    make_adapter(tmp_path / "other", tmp_path / "other-lora", 0)
    with pytest.raises(ValueError, match=r"LoRA module 'model.layers.0.[a-z_.]+' of adapter .*other-lora gives a delta of shape .* but the pretrained weight"):
        mm.TaskVectors.from_models(base, [tmp_path / "other-lora"])


def test_adapter_trained_on_another_base_of_the_same_shapes_is_merged_with_a_warning(llama_zoo, adapters, tmp_path):
    import warnings

    _, base, _ = llama_zoo
    root, _ = adapters
    torch.manual_seed(7)  # the same architecture and shapes, other weights: nothing but the name tells them apart
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "other")
    make_adapter(tmp_path / "other", tmp_path / "other-lora", 0)
    assert json.loads((tmp_path / "other-lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "other")
    with pytest.warns(UserWarning, match=r"LoRA adapter .*other-lora was trained on base model '.*other' .*but the pretrained "
                                         r"model here is '.*base'"):
        mm.TaskVectors.from_models(base, {"x": tmp_path / "other-lora"})
    with warnings.catch_warnings():  # trained on this base (named by its path): no warning, whether given as a folder or a module
        warnings.filterwarnings("error", message="LoRA adapter")
        mm.TaskVectors.from_models(base, {"plain": root / "plain"})
        mm.TaskVectors.from_models(load(base, torch.float32), {"plain": root / "plain"})


def test_adapter_base_names_are_compared_sensibly(tmp_path):
    import warnings

    from map_merge.task_vectors.adapter_base import warn_if_other_base

    folder = tmp_path / "Llama-2-7b-hf"
    folder.mkdir()
    cache = tmp_path / "hub" / "models--meta-llama--Llama-3-8B" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "org/renamed-base"}))

    def warns(adapter_names, pretrained):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_other_base(tmp_path / "adapter", adapter_names, pretrained)
        return any("LoRA adapter" in str(w.message) for w in caught)

    assert not warns(str(folder), folder) and not warns(str(folder) + "/", str(folder / ".." / folder.name))  # resolved paths
    assert not warns("meta-llama/Llama-2-7b-hf", folder)  # a hub name against the folder's name
    assert warns("meta-llama/Llama-2-13b-hf", folder)
    assert not warns("meta-llama/Llama-3-8B", cache) and warns("meta-llama/Llama-3-70B", cache)  # a cache snapshot
    assert not warns("org/renamed-base", named) and warns("org/other", named)  # its config's _name_or_path
    assert warns(str(named), folder) and warns(str(tmp_path / "gone" / "base"), folder)  # another local folder; a path gone
    assert not warns(None, folder) and not warns("", folder)  # the adapter names nothing
    assert not warns("org/x", {"w": torch.zeros(1)})  # a state dict: nothing to compare


def test_objective_on_streamed_vectors_keeps_one_live_model(llama_zoo, tmp_path):
    _, base, fts = llama_zoo
    tv = mm.TaskVectors.from_models(base, fts[:2])
    model = load(base)
    tokens = torch.tensor([[2, 4, 6, 8, 10, 12]])

    def loss(m):
        return float(m(tokens, labels=tokens).loss)

    store = mm.EvaluationStore(tmp_path / "evals.sqlite")
    objective = mm.ModelObjective(model, tv, {"lm": mm.Task(loss, sense="min")}, store=store, progress=False)
    values = objective([[0.2, 0.8], [1.0, 0.0]])
    reference = load(base)
    mm.TaskVectors.from_models(base, fts[:2], storage="dense").merge_into(reference, [0.2, 0.8])
    assert values[0, 0] == pytest.approx(loss(reference), rel=1e-6)
    assert next(model.parameters()).dtype == torch.bfloat16
    # the store key needs no pass over the weights and is stable
    assert mm.TaskVectors.from_models(base, fts[:2]).fingerprint() == tv.fingerprint()
    again = mm.ModelObjective(load(base), mm.TaskVectors.from_models(base, fts[:2]), {"lm": mm.Task(loss, sense="min")},
                              store=store, progress=False)
    again([[0.2, 0.8]])
    assert again.num_evaluations == 0 and again.num_cached == 1


def test_merged_adapter_is_exact_and_loads_in_peft(llama_zoo, adapters, tmp_path):
    _, base, fts = llama_zoo
    root, _ = adapters
    tv = mm.TaskVectors.from_models(base, {n: root / n for n in ["plain", "rslora", "save"]})
    c = [0.7, -0.5, 1.3]
    folder = tv.save_merged_adapter(tmp_path / "merged-adapter", c)
    model = peft.PeftModel.from_pretrained(load(base, torch.float32), folder).merge_and_unload()
    expected = tv.merge(c, dtype=torch.float32)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5, msg=key)
    mixed = mm.TaskVectors.from_models(base, {"full": fts[0], "lora": root / "plain"})
    with pytest.raises(ValueError, match="every task to be a LoRA adapter"):
        mixed.save_merged_adapter(tmp_path / "no", [1.0, 1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_merge_into_a_cuda_model_merges_on_cuda(llama_zoo, adapters):
    _, base, fts = llama_zoo
    root, _ = adapters
    tv = mm.TaskVectors.from_models(base, {"a": fts[0], "b": fts[1], "lora": root / "plain"})
    model = load(base).to("cuda")
    c = [0.4, 0.3, 0.9]
    tv.merge_into(model, c)
    expected = tv.merge(c)
    for key, value in model.state_dict().items():
        assert value.device.type == "cuda" and value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float().cpu(), expected[key].to(torch.bfloat16).float(), rtol=0, atol=1e-2)


def test_merge_into_survives_tensors_put_in_under_inference_mode(tmp_path):
    # transformers' tie_weights pads BERT's LM-head bias through .data; run by an evaluator under
    # torch.inference_mode() it leaves an inference tensor in the model, which cannot be written in place
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, is_decoder=True)
    torch.manual_seed(0)
    transformers.BertLMHeadModel(config).save_pretrained(tmp_path / "base")
    transformers.BertLMHeadModel(config).save_pretrained(tmp_path / "ft")
    tv = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "ft"])
    live = transformers.BertLMHeadModel.from_pretrained(tmp_path / "base")
    with torch.inference_mode():
        live.cls.predictions.decoder.bias.data = torch.nn.functional.pad(live.cls.predictions.decoder.bias.data, (0, 0))
    tv.merge_into(live, [0.5])
    expected = tv.merge([0.5])
    state = live.state_dict()
    for key, value in state.items():
        assert not value.is_inference()
        if key in expected:  # the tied decoder weight is the embedding's, checked under its own key
            torch.testing.assert_close(value, expected[key], msg=key)
    assert "cls.predictions.bias" in expected and torch.equal(state["cls.predictions.decoder.bias"], state["cls.predictions.bias"])
