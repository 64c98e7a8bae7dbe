"""The language-model zoo at its tiny setting: the build and its folders, the storages it yields,
the objectives against hand-computed cross-entropy and log-likelihoods, the cache, the seed."""

import json

import numpy as np
import pytest
import torch

from map_merge.zoo import load_zoo
from map_merge.zoo.lm import LM_SIZES, load_lm_zoo

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def zoo():
    return load_zoo("lm", size="tiny", progress=False)


def _safetensors_dtypes(folder):
    from safetensors import safe_open

    dtypes = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            dtypes |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    return dtypes


def test_folders_load_with_transformers_and_peft(zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(zoo.base_path)
    ids = tokenizer("x = 12 + 7")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "x = 12 + 7"
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert [tokenizer.decode([i]) for i in tokenizer("2024", add_special_tokens=False)["input_ids"]] == ["2", "0", "2", "4"]
    base = AutoModelForCausalLM.from_pretrained(zoo.base_path)
    assert isinstance(base, LlamaForCausalLM) and _safetensors_dtypes(zoo.base_path) == {"BF16"}
    assert zoo.kinds == {"code": "full", "medical": "lora", "legal": "full", "arithmetic": "lora"}
    text = zoo.texts["code"]["val"][0]
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=zoo.recipe.max_length)
    for name, kind in zoo.kinds.items():
        folder = zoo.experts[name]
        merged = zoo.expert_model(name, dtype=torch.float32)  # a one-hot merge through the task vectors
        if kind == "full":  # a sharded bf16 HF folder with its index
            shards = sorted(folder.glob("model-*-of-*.safetensors"))
            assert len(shards) >= 2 and (folder / "model.safetensors.index.json").exists()
            assert _safetensors_dtypes(folder) == {"BF16"}
            reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:  # a PEFT adapter folder; peft's own merge is the reference
            assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
            assert (folder / "adapter_model.safetensors").exists()
            reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base_path, dtype=torch.float32), folder).merge_and_unload()
        with torch.inference_mode():
            got, want = merged(**inputs).logits, reference.eval()(**inputs).logits
        assert torch.allclose(got, want, atol=1e-4), (name, (got - want).abs().max())
        assert not torch.allclose(got, base.float()(**inputs).logits, atol=1e-3)  # the expert differs from the base


def test_task_vectors_exercise_streamed_lora_and_mixed_storage(zoo):
    assert zoo.task_names == ("code", "medical", "legal", "arithmetic")
    assert zoo.task_vectors().storage == "mixed"
    assert zoo.task_vectors(["code", "legal"]).storage == "streamed"
    assert zoo.task_vectors(["medical", "arithmetic"]).storage == "lora"
    mixed = zoo.task_vectors(["code", "medical"])
    assert mixed.storage == "mixed" and mixed.names == ("code", "medical")
    with pytest.raises(ValueError, match=r"unknown or no domain\(s\) \['poetry'\]"):
        zoo.task_vectors(["code", "poetry"])


def _cross_entropy(model, tokenizer, texts, max_length):
    """Mean next-token cross-entropy over all predicted tokens, one text at a time (no padding)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
            count += ids.shape[1] - 1
    return total / count


def test_held_out_loss_objective_against_hand_computed_cross_entropy(zoo):
    objective = zoo.objective(["code", "arithmetic"], progress=False)
    assert objective.senses == ("min", "min") and objective.task_names == ("code", "arithmetic")
    coeffs = np.array([[0.0, 0.0], [1.0, 0.0], [0.3, 0.8]])
    metrics = objective(coeffs)
    tv = zoo.task_vectors(["code", "arithmetic"])
    for row, c in enumerate(coeffs):
        model = zoo.new_model()  # bf16, as the objective's live model
        tv.merge_into(model, c)
        for col, name in enumerate(["code", "arithmetic"]):
            want = _cross_entropy(model, zoo.tokenizer, zoo.texts[name]["val"], zoo.recipe.max_length)
            assert metrics[row, col] == pytest.approx(want, rel=2e-3)
    # test-split reports: same numbers through evaluate_coeffs and a test-split objective
    test = zoo.evaluate_coeffs(coeffs[1:], ["code", "arithmetic"], split="test")
    assert np.allclose(test, zoo.objective(["code", "arithmetic"], split="test", progress=False)(coeffs[1:]))
    assert zoo.texts["code"]["val"] != zoo.texts["code"]["test"]
    with pytest.raises(ValueError, match="split must be 'val' or 'test'"):
        zoo.objective(["code"], split="train")
    with pytest.raises(ValueError, match="metric must be 'loss'"):
        zoo.objective(["code"], metric="accuracy")


def test_every_expert_beats_the_base_on_its_own_domain(zoo):
    objective = zoo.objective(progress=False)
    metrics = objective(np.vstack([np.zeros(4), np.eye(4)]))
    base, experts = metrics[0], np.diag(metrics[1:])
    assert (experts < base).all(), (base, experts)


def _choice_accuracy(model, tokenizer, docs, max_length):
    """lm-eval's multiple-choice ``acc`` by hand: the choice of highest summed log-likelihood after
    the context (context and continuation tokenized together, left-truncated to the window)."""
    correct = 0
    with torch.inference_mode():
        for doc in docs:
            context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["context"] + choice, add_special_tokens=False)["input_ids"]
                n = len(whole) - len(context)
                window = whole[-(max_length + 1):]
                ids = torch.tensor([window[:-1]])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                targets = torch.tensor(window[1:])
                scores.append(float(logp[torch.arange(len(targets)), targets][-n:].sum()))
            correct += int(np.argmax(scores) == doc["label"])
    return correct / len(docs)


def test_lm_eval_task_scores_the_live_model_as_by_hand(zoo, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    val, test = zoo.choice_tasks["arithmetic"]["val"], zoo.choice_tasks["arithmetic"]["test"]
    assert "validation_split: validation" in val.read_text() and "test_split" not in val.read_text()
    assert "test_split: test" in test.read_text()
    docs = [json.loads(line) for line in val.with_suffix(".jsonl").read_text().splitlines()]
    test_docs = [json.loads(line) for line in test.with_suffix(".jsonl").read_text().splitlines()]
    assert len(docs) == zoo.recipe.choice_val and all(len(d["choices"]) == 4 for d in docs)
    assert {d["context"] for d in docs}.isdisjoint({d["context"] for d in test_docs})
    for doc in docs:  # the right answer is the equation's result
        question = doc["context"].split("\n")[-1].rstrip("=")
        assert int(doc["choices"][doc["label"]]) == eval(question)  # noqa: S307 - our own generated digits
    assert zoo.lm_eval_task("arithmetic", "val").sense == "max"
    # through the zoo's objective (metric="lm_eval"): lm-eval scores the live merged model
    objective = zoo.objective(["arithmetic"], metric="lm_eval", progress=False)
    assert objective.senses == ("max",)
    accuracy = objective(np.ones((1, 1)))[0, 0]
    expert = zoo.expert_model("arithmetic")
    assert accuracy == pytest.approx(_choice_accuracy(expert, zoo.tokenizer, docs, zoo.recipe.max_length))


def test_cached_reload_and_same_seed_same_weights(zoo, monkeypatch):
    import map_merge.zoo.lm_train as lm_train
    from safetensors.torch import load_file

    monkeypatch.setattr(lm_train, "train_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = load_lm_zoo(size="tiny", progress=False)
    assert again.folder == zoo.folder and again.info == zoo.info
    monkeypatch.undo()
    rebuilt = load_lm_zoo(size="tiny", progress=False, cache_dir=zoo.folder.parent / "again")
    for name in ("base", "experts/code", "experts/medical"):
        for path in sorted((zoo.folder / name).glob("*.safetensors")):
            first, second = load_file(str(path)), load_file(str(rebuilt.folder / name / path.name))
            assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), (name, path.name)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown lm zoo size 'huge'"):
        load_lm_zoo(size="huge")
    with pytest.raises(ValueError, match=r"unknown lm zoo domain\(s\) \['poetry'\]"):
        load_lm_zoo(["poetry"], size="tiny")
    from dataclasses import replace

    with pytest.raises(ValueError, match="recipe.kinds must give 'full' or 'lora'"):
        load_lm_zoo(size=replace(LM_SIZES["tiny"], kinds=(("code", "dense"),)))
    with pytest.raises(TypeError, match="takes no options"):
        load_zoo("vision", size="tiny")


def test_a_zoo_another_process_finished_first_is_kept(zoo, tmp_path, monkeypatch):
    """Two processes building the same zoo: the one finishing second must not move the first's
    complete folder away (other processes may be reading its experts) but use it."""
    import shutil

    import map_merge.zoo.lm as lm

    root = tmp_path / "cache"
    real_build = lm._build
    calls = []

    def build_then_another_finishes(folder, *args, **kwargs):
        calls.append(folder)
        real_build(folder, *args, **kwargs)
        shutil.copytree(zoo.folder, root / zoo.folder.name)  # meanwhile, another builder completed the same zoo
        (root / zoo.folder.name / "in-use").write_text("a reader's file")

    monkeypatch.setattr(lm, "_build", build_then_another_finishes)
    loaded = load_lm_zoo(size="tiny", progress=False, cache_dir=root)
    assert len(calls) == 1 and loaded.folder == root / zoo.folder.name
    assert (loaded.folder / "in-use").exists()  # the finished folder was kept, ours dropped
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [zoo.folder.name]


def test_concurrent_loads_build_once(zoo, tmp_path, monkeypatch):
    """A second loader waits for the build in progress and reuses it (one build, not two), and a
    killed build's leftover temporary folder is cleared."""
    import threading

    import map_merge.zoo.lm as lm

    root = tmp_path / "cache"
    (root / f"{zoo.folder.name}.tmp-999999").mkdir(parents=True)  # what a killed build left
    real_build, calls, started = lm._build, [], threading.Event()

    def slow_build(folder, *args, **kwargs):
        calls.append(folder)
        started.set()
        real_build(folder, *args, **kwargs)

    monkeypatch.setattr(lm, "_build", slow_build)
    results, errors = [], []

    def load():
        try:
            results.append(load_lm_zoo(size="tiny", progress=False, cache_dir=root, threads=None))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    first = threading.Thread(target=load)
    first.start()
    started.wait(timeout=300)
    second = threading.Thread(target=load)
    second.start()
    first.join()
    second.join()
    assert not errors, errors
    assert len(calls) == 1 and results[0].folder == results[1].folder == root / zoo.folder.name
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [zoo.folder.name]


def test_what_killed_builds_left_is_cleaned(tmp_path):
    """Temporary folders of builders that are gone are removed (the zoo's own and its tasks');
    a previous build a killed rebuild had moved away is put back when it is the only copy, and
    removed once a complete zoo replaced it; this process's folders are left alone."""
    import os
    import subprocess
    import sys

    import map_merge.zoo.lm as lm

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    folder = tmp_path / "lm-zoo"
    stale = [tmp_path / f"lm-zoo.tmp-{dead}", folder / f"tasks.tmp-{dead}"]
    previous = tmp_path / f"lm-zoo.old-{dead}"
    ours = tmp_path / f"lm-zoo.tmp-{os.getpid()}"
    for item in [previous, ours, stale[0]]:
        item.mkdir()
    (previous / "info.json").write_text("the previous build")
    lm._clean_stale(tmp_path, folder)  # killed between the two renames: the old build is the only copy
    assert (folder / "info.json").read_text() == "the previous build" and not previous.exists()
    previous.mkdir()
    stale[1].mkdir()
    lm._clean_stale(tmp_path, folder)  # killed after them: the old one was replaced
    assert not previous.exists() and not any(item.exists() for item in stale)
    assert (folder / "info.json").exists() and ours.exists()
