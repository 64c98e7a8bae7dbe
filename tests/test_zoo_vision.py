"""The vision zoo: real images, real CNNs, real merges (fast enough for every test run)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import map_merge as mm
from map_merge.zoo import load_vision_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return load_vision_zoo(["rotated", "inverted", "mirrored_parity"], progress=False)


def test_finetuning_helps_and_merging_trades_off(zoo):
    for name in zoo.task_names:
        ft = zoo.new_encoder()
        ft.load_state_dict(zoo.finetuned[name])
        ft.eval()
        assert zoo.accuracy(ft, name, "test") > zoo.accuracy(zoo.pretrained, name, "test") + 0.2
    # one-hot merge = the fine-tuned model, through the live-model objective
    objective = zoo.objective(["rotated", "inverted"], progress=False)
    metrics = objective(np.array([[1.0, 0.0], [0.0, 1.0]]))
    ft = zoo.new_encoder()
    ft.load_state_dict(zoo.finetuned["rotated"])
    assert metrics[0, 0] == pytest.approx(zoo.accuracy(ft, "rotated", "val"))
    assert metrics[0, 0] > metrics[1, 0] and metrics[1, 1] > metrics[0, 1]  # a genuine trade-off


def test_accuracy_is_a_noisy_estimate_and_the_loss_is_not(zoo):
    # 0/1 scores on a few hundred images: MAP's picks must score real evaluations by the model
    assert zoo.objective(["rotated", "inverted"], progress=False).noisy == (True, True)
    assert zoo.objective(["rotated", "inverted"], metric="loss", progress=False).noisy == (False, False)


def test_cache_reloads_same_weights_without_training(zoo, tmp_path, monkeypatch):
    import map_merge.zoo.vision as vision

    first = load_vision_zoo(["rotated"], cache_dir=str(tmp_path), progress=False)
    monkeypatch.setattr(vision, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = load_vision_zoo(["rotated"], cache_dir=str(tmp_path), progress=False)
    for key, value in first.finetuned["rotated"].items():
        assert torch.equal(value, again.finetuned["rotated"][key])
    for key, value in first.pretrained.state_dict().items():
        assert torch.equal(value, again.pretrained.state_dict()[key])


def test_zoo_cache_files_are_whole_or_absent(tmp_path, monkeypatch):
    """A cache write that fails mid-file (a kill, a full disk) leaves the file as it was before and
    no temporary beside it: another process building the same zoo reads a whole cache or none."""
    import safetensors.torch

    from map_merge.zoo.base import load_zoo_weights, save_zoo_weights

    heads = {"a": torch.nn.Linear(2, 2)}
    first = {"a": {"w": torch.ones(3)}}
    save_zoo_weights(tmp_path, None, first, heads, {"v": 1})
    real = safetensors.torch.save_file

    def half_written(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\x00" * 5)  # a torn file
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_zoo_weights(tmp_path, None, {"a": {"w": torch.zeros(3)}}, heads, {"v": 2})
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetuned-a.safetensors", "heads.safetensors", "info.json"]
    loaded = load_zoo_weights(tmp_path, None, ["a"], {"a": torch.nn.Linear(2, 2)})
    assert torch.equal(loaded["a"]["w"], torch.ones(3))


def test_same_seed_same_weights(tmp_path):
    a = load_vision_zoo(["inverted"], cache_dir="", progress=False)
    b = load_vision_zoo(["inverted"], cache_dir="", progress=False)
    for key, value in a.finetuned["inverted"].items():
        assert torch.equal(value, b.finetuned["inverted"][key])


def test_map_on_real_models_against_dense_grid_and_random_search(zoo, tmp_path):
    """MAP's re-evaluated front (12 samples + 12 re-evaluations) against a 9x9 grid of real
    evaluations, and against random search with the same 24 evaluations."""
    store = mm.EvaluationStore(tmp_path / "store.sqlite")
    map_ratios, random_ratios = [], []
    for names in (["rotated", "inverted"], ["rotated", "mirrored_parity"], ["inverted", "mirrored_parity"]):
        objective = zoo.objective(names, store=store, progress=False)
        grid = mm.designs.grid_design(2, 9)
        grid_metrics = objective(grid)
        reference = grid_metrics[mm.pareto_mask(grid_metrics)]
        ref_point = grid_metrics.min(axis=0)
        result = mm.MAP(seed=0).fit(objective, 2)
        assert result.num_evaluations == 12
        real = result.reevaluate(objective, max_points=12)
        assert np.abs(result.predict(real.coeffs) - real.metrics).mean() < 0.1
        map_ratios.append(mm.front_metrics.front_report(real.metrics[mm.pareto_mask(real.metrics)], reference, ref_point)["hv_ratio"])
        random = objective(np.random.default_rng(0).uniform(size=(24, 2)))
        random_ratios.append(mm.front_metrics.front_report(random[mm.pareto_mask(random)], reference, ref_point)["hv_ratio"])
        before = objective.num_evaluations
        objective(grid)
        assert objective.num_evaluations == before  # the store answers repeated evaluations
    assert min(map_ratios) > 0.5
    assert np.mean(map_ratios) > np.mean(random_ratios)
    assert np.mean(map_ratios) > 0.85


def test_limited_split_scores_the_first_examples(zoo):
    name = zoo.limit_split("val", 50)
    assert name == "val[:50]" and zoo.limit_split("val", None) == "val"
    encoder = zoo.new_encoder().eval()
    task = zoo.tasks["rotated"]
    with torch.inference_mode():
        logits = task.head(zoo.features(encoder, task.splits["val"].inputs))
    expected = float((logits.argmax(-1)[:50] == task.splits["val"].labels[:50]).float().mean())
    assert zoo.accuracy(encoder, "rotated", name) == pytest.approx(expected)
    # the store keeps limited and full splits apart
    full, limited = zoo.objective(["rotated"], progress=False), zoo.objective(["rotated"], split=name, progress=False)
    assert full.fingerprint() != limited.fingerprint()
    with pytest.raises(ValueError, match="num_examples must be at least 1"):
        zoo.limit_split("val", 0)
    with pytest.raises(ValueError, match="has no split 'dev'"):
        zoo.limit_split("dev", 10)


def test_train_loss_is_the_heads_cross_entropy_on_a_fresh_batch(zoo):
    generator = torch.Generator().manual_seed(5)
    loss = zoo.train_loss("inverted", batch_size=16, generator=generator)
    encoder = zoo.new_encoder()
    first, second = loss(encoder).item(), loss(encoder).item()
    assert first != second  # a new minibatch per call
    data = zoo.tasks["inverted"].splits["train"]
    index = torch.randint(0, len(data), (16,), generator=torch.Generator().manual_seed(5))
    logits = zoo.tasks["inverted"].head(zoo.features(encoder, {k: v[index] for k, v in data.inputs.items()}))
    assert first == pytest.approx(float(torch.nn.functional.cross_entropy(logits, data.labels[index])), rel=1e-5)


def test_the_build_trains_on_its_own_thread_count_whoever_calls_it(tmp_path):
    """A float sum split over more threads rounds differently (two threads here gave other weights than
    one): the build pins BUILD_THREADS, so a 2-thread caller (a notebook on torch's default) and a 1-thread
    one (a test worker, a benchmark) build the same zoo, and the caller's thread count comes back."""
    import json

    from map_merge.zoo.base import BUILD_THREADS

    ambient = torch.get_num_threads()
    try:
        torch.set_num_threads(BUILD_THREADS + 1)
        wide = load_vision_zoo(["rotated"], cache_dir=str(tmp_path), progress=False)
        assert torch.get_num_threads() == BUILD_THREADS + 1  # restored
        torch.set_num_threads(BUILD_THREADS)
        narrow = load_vision_zoo(["rotated"], cache_dir="", progress=False)  # built again, in memory
    finally:
        torch.set_num_threads(ambient)
    for key, value in wide.finetuned["rotated"].items():
        assert torch.equal(value, narrow.finetuned["rotated"][key]), key
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "info.json").read_text())["threads"] == BUILD_THREADS
