"""Real pretrained model (the packaged all-MiniLM-L6-v2): task vectors and in-place merges."""

import numpy as np
import pytest
import torch

import map_merge as mm

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
    from map_merge.zoo.text import minilm_path

    try:
        path = minilm_path()
    except ImportError as error:
        pytest.skip(str(error))
    return path, transformers.AutoModel.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def test_merge_into_minilm_matches_loaded_state_dict(minilm):
    path, base, tokenizer = minilm
    generator = torch.Generator().manual_seed(0)
    finetuned = []
    for scale in (0.02, 0.03):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for key in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.5.output.dense.weight"):
            state[key] += scale * torch.randn(state[key].shape, generator=generator)
        finetuned.append(state)
    tv = mm.TaskVectors.from_models(path, finetuned, names=["a", "b"])
    assert tv.num_params == sum(v.numel() for v in base.state_dict().values() if v.is_floating_point())
    nonzero = (tv.vectors != 0).sum(dim=1)
    assert nonzero.tolist() == [384 * 1536 * 2] * 2  # only the two perturbed matrices moved
    batch = tokenizer(["merging models", "a Pareto front"], return_tensors="pt", padding=True)
    live = transformers.AutoModel.from_pretrained(path)
    reference = transformers.AutoModel.from_pretrained(path)
    for coeffs in ([0.3, 0.7], [1.0, 0.0]):
        tv.merge_into(live, coeffs)
        reference.load_state_dict(tv.merge(coeffs), strict=False)
        live.eval(), reference.eval()
        with torch.inference_mode():
            torch.testing.assert_close(live(**batch).last_hidden_state, reference(**batch).last_hidden_state)
    expected = base.state_dict()["encoder.layer.0.intermediate.dense.weight"] + (finetuned[0]["encoder.layer.0.intermediate.dense.weight"] - base.state_dict()["encoder.layer.0.intermediate.dense.weight"])
    torch.testing.assert_close(live.encoder.layer[0].intermediate.dense.weight.detach(), expected)
    cos = tv.cosine_similarity()
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-12)
