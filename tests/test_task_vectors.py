import json

import numpy as np
import pytest
import torch
from conftest import TinyNet

import map_merge as mm


def test_merge_is_task_arithmetic_hand_computed(tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    assert tv.num_tasks == 3 and tv.vectors.shape == (3, tv.num_params)
    c = [0.5, -0.25, 2.0]
    merged = tv.merge(c)
    for key, value in base.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(merged[key], value)  # integer buffers come from the pretrained model
            continue
        expected = value + sum(ci * (ft.state_dict()[key] - value) for ci, ft in zip(c, fts))
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)


def test_one_hot_recovers_finetuned_and_zero_recovers_base(tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, {"a": fts[0], "b": fts[1], "c": fts[2]})
    assert tv.names == ("a", "b", "c")
    for i, ft in enumerate(fts):
        merged = tv.merge(np.eye(3)[i])
        torch.testing.assert_close(merged["lin.weight"], ft.lin.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(tv.merge([0, 0, 0])["norm.running_mean"], base.norm.running_mean)


def test_merge_into_matches_merge_and_reuses_storage(tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    model = TinyNet()
    tv.merge_into(model, [0.3, 0.3, 0.3])
    ptr = model.lin.weight.data_ptr()
    tv.merge_into(model, [0.1, 0.7, 0.2])
    assert model.lin.weight.data_ptr() == ptr  # written in place, no new allocation
    expected = tv.merge([0.1, 0.7, 0.2])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    idx = torch.tensor([0, 3, 4])
    reference = TinyNet()
    reference.load_state_dict(expected)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(idx), reference(idx))


def test_tied_weights_stored_once_and_stay_tied():
    torch.manual_seed(1)
    base = TinyNet(tie=True)
    ft = TinyNet(tie=True)
    tv = mm.TaskVectors.from_models(base, [ft])
    untied_params = sum(p.numel() for p in base.parameters()) + 8  # + running mean/var
    assert tv.num_params == untied_params  # embedding counted once
    model = TinyNet(tie=True)
    tv.merge_into(model, [0.5])
    assert model.out.weight.data_ptr() == model.embed.weight.data_ptr()
    expected = 0.5 * (base.embed.weight + ft.embed.weight)
    torch.testing.assert_close(model.out.weight, expected.detach())


def test_ties_hand_computed():
    v = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, 0.2, 0.1], [2.0, 2.5, -0.3, -1.0]])
    out = mm.Ties(k=0.5).prepare(v)
    # top-2 per task: t0 keeps -2, 3; t1 keeps -4, 1; t2 keeps 2, 2.5
    # summed mass: [-4+2, -2+1+2.5, 3, 0] = [-2, 1.5, 3, 0] -> signs [-, +, +, 0]
    expected = torch.tensor([[0.0, 0.0, 3.0, 0.0], [-4.0, 1.0 / 2, 0.0, 0.0], [0.0, 2.5 / 2, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    # uniform coefficients give TIES-merging: lam * disjoint mean
    torch.testing.assert_close(0.7 * out.sum(0), 0.7 * torch.tensor([-4.0, 1.75, 3.0, 0.0]))


def test_dare_is_seeded_and_rescales():
    v = torch.arange(1.0, 2001.0).reshape(2, 1000)
    a = mm.Dare(p=0.3, seed=5).prepare(v)
    b = mm.Dare(p=0.3, seed=5).prepare(v)
    c = mm.Dare(p=0.3, seed=6).prepare(v)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    torch.testing.assert_close(a[kept], v[kept] / 0.7)
    assert abs(kept.float().mean().item() - 0.7) < 0.05
    with_ties = mm.Dare(p=0.3, seed=5, ties=mm.Ties(k=0.5)).prepare(v)
    torch.testing.assert_close(with_ties, mm.Ties(k=0.5).prepare(a))


def test_merge_with_method_uses_prepared_vectors(tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    prepared = mm.Ties(k=0.3).prepare(tv.vectors)
    flat = tv.merge_flat([0.2, 0.4, 0.6], method=mm.Ties(k=0.3))
    torch.testing.assert_close(flat, tv.base + torch.tensor([0.2, 0.4, 0.6]) @ prepared)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd.pop("lin.bias"), "missing keys \\['lin.bias'\\]"),
        (lambda sd: sd.__setitem__("extra.w", torch.zeros(2)), "unexpected keys \\['extra.w'\\]"),
        (lambda sd: sd.__setitem__("lin.weight", torch.zeros(2, 2)), "shape mismatch for 'lin.weight'"),
        (lambda sd: sd["lin.weight"].__setitem__((0, 0), float("nan")), "'lin.weight' of the fine-tuned model 'bad' has 1 NaN"),
        (lambda sd: sd.__setitem__("lin.bias", torch.zeros(4, dtype=torch.int64)), "non-floating dtype"),
    ],
)
def test_validation_names_key_and_model(tiny_models, mutate, message):
    base, fts = tiny_models
    sd = {k: v.clone() for k, v in fts[0].state_dict().items()}
    mutate(sd)
    with pytest.raises(ValueError, match=message):
        mm.TaskVectors.from_models(base, {"good": fts[1], "bad": sd})


def test_validation_of_model_lists(tiny_models):
    base, fts = tiny_models
    with pytest.raises(ValueError, match="at least one fine-tuned"):
        mm.TaskVectors.from_models(base, [])
    with pytest.raises(ValueError, match="duplicate task names"):
        mm.TaskVectors.from_models(base, fts[:2], names=["x", "x"])
    tv = mm.TaskVectors.from_models(base, fts)
    with pytest.raises(ValueError, match="expected 3 coefficients"):
        tv.merge([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        tv.merge([1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="unknown merge method"):
        tv.merge([1, 1, 1], method="magic")
    with pytest.raises(ValueError, match="does not match the task vectors"):
        tv.merge_into(torch.nn.Linear(2, 2), [1, 1, 1])


def test_load_from_safetensors_and_hf_folder(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    base, ft = BertModel(config), BertModel(config)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    tv = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "ft"], names=["t"])
    # integer buffers (position ids) are not merged
    assert all("position_ids" not in k for k in tv.keys)
    out = tv.save_merged(tmp_path / "merged.safetensors", [1.0])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["map_merge"])
        weight = f.get_tensor("encoder.layer.0.output.dense.weight")
    assert meta["coefficients"] == {"t": 1.0} and meta["method"]["name"] == "task_arithmetic"
    torch.testing.assert_close(weight, ft.encoder.layer[0].output.dense.weight.detach())
    tv2 = mm.TaskVectors.from_models(tmp_path / "base", [out], names=["t"])
    assert tv.storage == tv2.storage == "streamed"
    for key, value in tv.merge([0.5]).items():
        torch.testing.assert_close(tv2.merge([0.5])[key], value)
    folder = tv.save_merged(tmp_path / "hf", [0.5], method=mm.Ties(k=0.5), model=BertModel(config))
    reloaded = BertModel.from_pretrained(folder)
    torch.testing.assert_close(reloaded.pooler.dense.weight, tv.merge([0.5], mm.Ties(k=0.5))["pooler.dense.weight"])
    assert json.loads((folder / "map_merge.json").read_text())["method"] == {"name": "ties", "k": 0.5, "count": "int"}


def test_fingerprint_changes_with_weights(tiny_models):
    base, fts = tiny_models
    a = mm.TaskVectors.from_models(base, fts).fingerprint()
    assert a == mm.TaskVectors.from_models(base, fts).fingerprint()
    with torch.no_grad():
        fts[0].lin.bias[0] += 1e-3
    assert a != mm.TaskVectors.from_models(base, fts).fingerprint()


def test_dense_merge_into_keeps_each_tensors_dtype(tiny_models):
    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    c = [0.2, 0.5, -0.1]
    expected = tv.merge(c)
    half = TinyNet().half()  # one dtype: bound to one fp16 buffer, arithmetic in fp32
    mixed = TinyNet()
    mixed.lin.to(torch.bfloat16)  # mixed dtypes: each tensor written in its own dtype
    for model in (half, mixed):
        before = {k: v.dtype for k, v in model.state_dict().items()}
        tv.merge_into(model, c)
        tv.merge_into(model, c)  # the second call reuses the binding
        for key, value in model.state_dict().items():
            assert value.dtype == before[key], key
            assert torch.equal(value, expected[key].to(value.dtype)), key


def test_zero_task_vector_warns_naming_the_task(tiny_models, tmp_path):
    base, fts = tiny_models
    with pytest.warns(UserWarning, match=r"\['same'\]: the fine-tuned model is identical to the pretrained one"):
        mm.TaskVectors.from_models(base, {"good": fts[0], "same": base.state_dict()})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in fts[0].state_dict().items()}, str(tmp_path / "ft.safetensors"))
    with pytest.warns(UserWarning, match=r"\['again'\]: the fine-tuned model is identical"):
        tv = mm.TaskVectors.from_models(tmp_path / "base.safetensors", {"ft": tmp_path / "ft.safetensors", "again": tmp_path / "base.safetensors"})
    assert tv.storage == "streamed"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.TaskVectors.from_models(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"])  # a real task vector: silent
