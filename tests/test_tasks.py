"""Task adapters against hand computations and independent runs."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import map_merge as mm


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from map_merge.zoo.text import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


class Bigram(nn.Module):
    """A causal LM whose logits at a position depend on that token only: ``E[x] @ W^T`` (low rank,
    so a 30k vocabulary stays small)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(0.5 * torch.randn(vocab, 8, generator=generator))
            self.out.weight.copy_(0.5 * torch.randn(vocab, 8, generator=generator))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.out(self.embed(input_ids)))


TEXTS = ["the cat sat on the mat", "a much longer sentence about dogs, cats and other animals", "ok"]


def hand_loss(model, tokenizer, texts, max_length):
    nll, count = 0.0, 0
    embed, out = model.embed.weight.detach().double(), model.out.weight.detach().double()
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        for t in range(len(ids) - 1):
            row = out @ embed[ids[t]]
            nll += float(torch.logsumexp(row, 0) - row[ids[t + 1]])
            count += 1
    return nll / count


@pytest.mark.parametrize("max_length, batch_size", [(64, 2), (5, 3), (64, 1)])
def test_held_out_loss_equals_hand_computation(tokenizer, max_length, batch_size):
    model = Bigram(tokenizer.vocab_size)
    expected = hand_loss(model, tokenizer, TEXTS, max_length)
    task = mm.HeldOutLoss(TEXTS, tokenizer, max_length=max_length, batch_size=batch_size)
    assert task(model) == pytest.approx(expected, rel=1e-6)
    assert mm.HeldOutLoss(TEXTS, tokenizer, max_length=max_length, perplexity=True)(model) == pytest.approx(math.exp(expected), rel=1e-5)
    assert task.sense == "min" and task.link == "softplus"


def test_held_out_loss_reads_files_and_refuses_nothing_to_score(tokenizer, tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "the cat sat on the mat"}\n{"text": "ok"}\n')
    model = Bigram(tokenizer.vocab_size)
    from_file = mm.HeldOutLoss(tmp_path / "t.jsonl", tokenizer)(model)
    assert from_file == pytest.approx(hand_loss(model, tokenizer, [TEXTS[0], "ok"], 512), rel=1e-6)
    with pytest.raises(ValueError, match="no texts to score"):
        mm.HeldOutLoss([], tokenizer)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no texts to score"):
        mm.HeldOutLoss(tmp_path / "empty.txt", tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="has no field 'text'"):
        mm.HeldOutLoss(tmp_path / "bad.jsonl", tokenizer)


def test_objective_takes_sense_link_and_data_of_task_adapters(tokenizer):
    model = Bigram(tokenizer.vocab_size)
    tuned = [Bigram(tokenizer.vocab_size, seed=s) for s in (1, 2)]
    tv = mm.TaskVectors.from_models(model, tuned)
    a = mm.ModelObjective(model, tv, {"lm": mm.HeldOutLoss(TEXTS, tokenizer)}, progress=False)
    b = mm.ModelObjective(model, tv, {"lm": mm.HeldOutLoss(TEXTS[:2], tokenizer)}, progress=False)
    assert a.senses == ("min",) and a.links == ("softplus",)
    assert a.fingerprint() != b.fingerprint()  # other data, other store key
    values = a([[0.5, 0.5]])
    reference = Bigram(tokenizer.vocab_size)
    tv.merge_into(reference, [0.5, 0.5])
    assert values[0, 0] == pytest.approx(hand_loss(reference, tokenizer, TEXTS, 512), rel=1e-6)


def test_classification_accuracy_and_loss_by_hand(tokenizer):
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(tokenizer.vocab_size, 4)

        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(last_hidden_state=self.embed(input_ids))

    encoder, head = Encoder(), nn.Linear(4, 3)
    texts, labels = ["good film", "bad", "fine enough movie", "terrible"], [0, 1, 2, 1]
    expected_logits = []
    for text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        expected_logits.append(head(encoder.embed(ids).mean(0)))
    logits = torch.stack(expected_logits)
    accuracy = float((logits.argmax(-1) == torch.tensor(labels)).float().mean())
    loss = float(nn.functional.cross_entropy(logits, torch.tensor(labels)))
    assert mm.Classification(texts, labels, tokenizer, head, batch_size=3)(encoder) == pytest.approx(accuracy)
    task = mm.Classification(texts, labels, tokenizer, head, metric="loss", batch_size=2)
    assert task(encoder) == pytest.approx(loss, rel=1e-5) and task.sense == "min"
    with pytest.raises(ValueError, match="4 texts but labels of shape"):
        mm.Classification(texts, labels[:3], tokenizer, head)
    np.testing.assert_equal(task.labels.numpy(), labels)
    # accuracy is right-or-wrong on N examples, a noisy estimate; the cross-entropy is taken as exact
    assert mm.Classification(texts, labels, tokenizer, head).noisy is True and task.noisy is False
    assert mm.Classification(texts, labels, tokenizer, head, noisy=False).noisy is False
    tv = mm.TaskVectors.from_models(encoder, [Encoder()])
    assert mm.ModelObjective(encoder, tv, {"a": mm.Classification(texts, labels, tokenizer, head)}, progress=False).noisy == (True,)
    with pytest.raises(ValueError, match="noisy must be True, False or None, got 'yes'"):
        mm.Classification(texts, labels, tokenizer, head, noisy="yes")


def _tiny_lm_folders(root, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for i, name in enumerate(["a", "b"]):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 1)))
        model.save_pretrained(root / name)
    return LlamaForCausalLM


def test_cli_scores_language_models_from_metric_specs(tmp_path, tokenizer, capsys):
    import json

    from map_merge.cli import main
    from map_merge.config import ConfigError, load_config

    model_class = _tiny_lm_folders(tmp_path, tokenizer)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:2]))
    (tmp_path / "b.txt").write_text("some other text entirely\nand a second line of it\n")
    fields = {"pretrained": "base", "finetuned": {"a": "a", "b": "b"}, "out": str(tmp_path / "out"), "num_samples": 8,
              "tasks": {"a": {"kind": "loss", "data": "a.jsonl"}, "b": {"kind": "loss", "data": "b.txt", "max_length": 8}}}
    (tmp_path / "run.yaml").write_text(json.dumps(fields))
    assert main(["map", "--config", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    coeffs, metrics = np.asarray(result["samples"]["coeffs"]), np.asarray(result["samples"]["metrics"])
    # ground truth: merge by hand (dense storage) and score with a fresh adapter
    tv = mm.TaskVectors.from_models(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], storage="dense")
    live = model_class.from_pretrained(tmp_path / "base")
    for row in (0, len(coeffs) - 1):
        tv.merge_into(live, coeffs[row])
        assert metrics[row, 0] == pytest.approx(mm.HeldOutLoss(TEXTS[:2], tokenizer)(live), rel=1e-5)
        assert metrics[row, 1] == pytest.approx(
            mm.HeldOutLoss(["some other text entirely", "and a second line of it"], tokenizer, max_length=8)(live), rel=1e-5)
    assert len(summary["coeffs"]) == 2
    # the pick is a Hugging Face folder that from_pretrained loads: the merge of the chosen coefficients
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    tv.merge_into(live, summary["coeffs"])
    tokens = torch.tensor([[5, 17, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(saved(tokens).logits, live(tokens).logits, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "out" / "merged" / "tokenizer_config.json").exists()
    bad = {**fields, "tasks": {"a": {"kind": "loss"}, "b": {"kind": "loss", "data": "b.txt"}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"field 'tasks.a' \(loss\) needs \['data'\]"):
        load_config(tmp_path / "bad.json")
    bad["tasks"] = {"a": {"kind": "bleu"}, "b": {"kind": "loss", "data": "b.txt"}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"field 'tasks.a' must be a mapping with 'kind' one of \['lm_eval', 'loss'\]"):
        load_config(tmp_path / "bad.json")
    bad["tasks"] = {"a": {"kind": "lm_eval", "task": "a_registered_task", "noisy": "yes"}, "b": {"kind": "loss", "data": "b.txt"}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"field 'tasks.a.noisy' must be true or false, got 'yes'"):
        load_config(tmp_path / "bad.json")


def _write_lm_eval_tasks(folder):
    import json

    reviews = ["great film", "awful plot", "loved every minute", "boring and slow", "superb acting", "dull", "a joy",
               "a mess", "wonderful cast", "tedious", "brilliant", "weak script"]
    rows = [{"text": t, "label": (i + 1) % 2} for i, t in enumerate(reviews)]
    data = folder / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "mm_choice.yaml").write_text(f"""task: mm_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "mm_ppl.yaml").write_text(f"""task: mm_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    empty = folder / "empty.jsonl"
    empty.write_text("")
    (folder / "mm_empty.yaml").write_text((folder / "mm_ppl.yaml").read_text().replace("mm_ppl", "mm_empty").replace(str(data), str(empty)))


def test_lm_eval_task_on_the_live_model_equals_lm_eval_on_the_saved_model(tmp_path, tokenizer, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"  # lm-eval prefixes loglikelihoods with one of them
    model_class = _tiny_lm_folders(tmp_path, tokenizer)
    _write_lm_eval_tasks(tmp_path)
    model = model_class.from_pretrained(tmp_path / "a").eval()
    choice = mm.LMEvalTask(tmp_path / "mm_choice.yaml", tokenizer=tokenizer, batch_size=4)
    perplexity = mm.LMEvalTask(tmp_path / "mm_ppl.yaml", tokenizer=tokenizer, batch_size=4)  # metric from lm-eval's defaults
    # metric and sense are known before any call: what the objective fixes at construction
    assert (perplexity.metric, perplexity.sense) == ("word_perplexity", "min") and (choice.metric, choice.sense) == ("acc", "max")
    assert mm.LMEvalTask(tmp_path / "mm_ppl.yaml", tokenizer=tokenizer, metric="bits_per_byte").sense == "min"
    live = {"acc": choice(model), "word_perplexity": perplexity(model)}
    # independent ground truth: lm-eval loading the same weights from disk itself
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'a'},tokenizer={tmp_path / 'base'},dtype=float32",
                                  tasks=["mm_choice", "mm_ppl"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  batch_size=4, bootstrap_iters=0, device="cpu")
    assert live["acc"] == pytest.approx(out["results"]["mm_choice"]["acc,none"])
    assert live["word_perplexity"] == pytest.approx(out["results"]["mm_ppl"]["word_perplexity,none"], rel=1e-5)
    assert perplexity.last_results["bits_per_byte,none"] == pytest.approx(out["results"]["mm_ppl"]["bits_per_byte,none"], rel=1e-5)
    # the same model object with other weights (what a merge does): the reused lm-eval wrapper reads them
    other = model_class.from_pretrained(tmp_path / "b").eval()
    model.load_state_dict(other.state_dict())
    fresh = mm.LMEvalTask(tmp_path / "mm_ppl.yaml", tokenizer=tokenizer, batch_size=4)
    assert perplexity(model) == pytest.approx(fresh(other), rel=1e-9) and perplexity(model) != pytest.approx(live["word_perplexity"])
    # a task travels to a Ray worker by pickling: settings kept, lm-eval's objects rebuilt there, same value
    import pickle

    copy = pickle.loads(pickle.dumps(choice))
    assert (copy.fingerprint, copy.sense, copy.metric, copy.noisy) == (choice.fingerprint, choice.sense, choice.metric, True)
    assert copy(model) == choice(model)
    with pytest.raises(ValueError, match="does not report metric 'f1'; it reports .*word_perplexity"):
        mm.LMEvalTask(tmp_path / "mm_ppl.yaml", tokenizer=tokenizer, metric="f1")
    with pytest.raises(ValueError, match="lm-eval has no task 'no_such_task'"):
        mm.LMEvalTask("no_such_task", tokenizer=tokenizer, include_path=tmp_path)
    with pytest.raises((ValueError, RuntimeError), match="(?i)empty|no results|no documents|0 examples"):
        mm.LMEvalTask(tmp_path / "mm_empty.yaml", tokenizer=tokenizer)
    # the fingerprint hashes the documents and requests: the same in another process, another with other data
    script = (f"import map_merge as mm; from transformers import AutoTokenizer; "
              f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'base')!r}); "
              f"print(mm.LMEvalTask({str(tmp_path / 'mm_choice.yaml')!r}, tokenizer=t).fingerprint)")
    assert _in_subprocess(script) == choice.fingerprint
    assert mm.LMEvalTask(tmp_path / "mm_choice.yaml", tokenizer=tokenizer, limit=5).fingerprint != choice.fingerprint
    # the same task scored through another tokenizer (other special tokens: other tokens scored) is another task
    other_tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other_tokenizer.bos_token, other_tokenizer.eos_token = "[SEP]", "[SEP]"
    assert mm.LMEvalTask(tmp_path / "mm_choice.yaml", tokenizer=other_tokenizer).fingerprint != choice.fingerprint


def test_model_objective_minimises_a_perplexity_task_from_the_start(tmp_path, tokenizer, monkeypatch):
    """The objective fixes the senses at construction: a perplexity task must say "min" then, and
    MAP on an analytic stand-in with those senses finds its minimum (not the maximum)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _write_lm_eval_tasks(tmp_path)
    perplexity = mm.LMEvalTask(tmp_path / "mm_ppl.yaml", tokenizer=tokenizer)
    model = Bigram(50)
    tv = mm.TaskVectors.from_models(model, [Bigram(50, seed=1), Bigram(50, seed=2)])
    objective = mm.ModelObjective(model, tv, {"ppl": perplexity}, progress=False)
    assert objective.senses == ("min",)  # before any evaluation
    optimum = np.array([0.3, 0.7])

    def stand_in(c):  # a perplexity-like bowl, lowest at the optimum
        return (2.0 + 5.0 * ((np.atleast_2d(c) - optimum) ** 2).sum(axis=1))[:, None]

    analytic = mm.FunctionObjective(stand_in, 2, ["ppl"], senses=objective.senses, links=["identity"])
    result = mm.MAP(final_model="quadratic", seed=0).fit(analytic, 2)
    np.testing.assert_allclose(result.select([1.0]), optimum, atol=0.02)


def _in_subprocess(script: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_fingerprints_hash_every_byte_and_agree_across_processes(tokenizer, tmp_path):
    texts, labels = ["good film", "bad", "fine enough movie"], [0, 1, 2]
    torch.manual_seed(0)
    head = nn.Linear(384, 3)
    twin = nn.Linear(384, 3)
    twin.load_state_dict(head.state_dict())
    base = mm.Classification(texts, labels, tokenizer, head)
    assert mm.Classification(texts, labels, tokenizer, twin).fingerprint == base.fingerprint
    with torch.no_grad():
        twin.weight[1, 200] += 1e-3  # one element: torch's repr of the weight does not show it
    assert repr(twin.weight) == repr(head.weight)
    assert mm.Classification(texts, labels, tokenizer, twin).fingerprint != base.fingerprint
    assert mm.Classification(texts, [0, 1, 1], tokenizer, head).fingerprint != base.fingerprint
    with_buffer = nn.Sequential(nn.Linear(384, 3), nn.BatchNorm1d(3))
    stats = mm.Classification(texts, labels, tokenizer, with_buffer).fingerprint
    with torch.no_grad():
        with_buffer[1].running_mean[2] += 1.0  # buffers are data too
    assert mm.Classification(texts, labels, tokenizer, with_buffer).fingerprint != stats
    # a pooling function is part of the task: two lambdas (one qualified name) differ, by content
    first = mm.Classification(texts, labels, tokenizer, head, pooling=lambda enc, x: enc(**x).last_hidden_state[:, 0]).fingerprint
    last = mm.Classification(texts, labels, tokenizer, head, pooling=lambda enc, x: enc(**x).last_hidden_state[:, -1]).fingerprint
    assert first != last
    loss = mm.HeldOutLoss(TEXTS, tokenizer, max_length=16)
    assert mm.HeldOutLoss(TEXTS, tokenizer, max_length=16).fingerprint == loss.fingerprint
    assert mm.HeldOutLoss(TEXTS[:1] + ["the cat sat on the hat"] + TEXTS[2:], tokenizer, max_length=16).fingerprint != loss.fingerprint
    # equal inputs, another process: the same fingerprints
    torch.save(head.state_dict(), tmp_path / "head.pt")
    script = (f"import torch; from torch import nn; import map_merge as mm; from transformers import AutoTokenizer; "
              f"t = AutoTokenizer.from_pretrained({tokenizer.name_or_path!r}); h = nn.Linear(384, 3); "
              f"h.load_state_dict(torch.load({str(tmp_path / 'head.pt')!r})); "
              f"print(mm.Classification({texts!r}, {labels!r}, t, h).fingerprint + ' ' + mm.HeldOutLoss({TEXTS!r}, t, max_length=16).fingerprint)")
    assert _in_subprocess(script) == f"{base.fingerprint} {loss.fingerprint}"


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_held_out_loss_in_chunks_from_low_precision_logits_equals_hand_computation(tokenizer, chunk_size):
    model = Bigram(tokenizer.vocab_size).to(torch.bfloat16)
    nll, count = 0.0, 0
    for text in TEXTS:  # by hand: the model's own bf16 logits, in float64
        ids = torch.tensor(tokenizer(text, truncation=True, max_length=64)["input_ids"])
        with torch.no_grad():
            logits = model(ids[None]).logits[0].double()
        nll += float((torch.logsumexp(logits[:-1], dim=-1) - logits[:-1].gather(1, ids[1:, None]).squeeze(1)).sum())
        count += len(ids) - 1
    task = mm.HeldOutLoss(TEXTS, tokenizer, max_length=64, batch_size=2, chunk_size=chunk_size)
    assert task(model) == pytest.approx(nll / count, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_held_out_loss_holds_at_most_one_fp32_chunk_on_the_gpu(tokenizer):
    vocab, length = 131072, 512
    model = Bigram(vocab).to("cuda", torch.bfloat16)
    task = mm.HeldOutLoss(["word " * 2 * length] * 2, tokenizer, max_length=length, batch_size=2)
    expected = mm.HeldOutLoss(["word " * 2 * length] * 2, tokenizer, max_length=length, batch_size=1, chunk_size=64)(model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    value = task(model)
    peak = torch.cuda.max_memory_allocated() - before
    logits_bytes = 2 * length * vocab * 2  # the forward's own bf16 logits
    chunk_bytes = ((1 << 24) // vocab) * vocab * 4
    assert peak < logits_bytes + 3 * chunk_bytes  # a whole fp32 copy would add 2 * logits_bytes
    assert value == pytest.approx(expected, rel=1e-5)


def test_held_out_loss_never_makes_an_fp32_tensor_larger_than_one_chunk(tokenizer):
    """On the CPU: every fp32 tensor any operation makes while scoring (the model's logits are
    bf16) holds at most one chunk of positions; a whole-logits fp32 copy would hold B x L x V."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from map_merge.tasks import chunked_cross_entropy

    class LargestFloat32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    self.numel = max(self.numel, value.numel())
            return out

    vocab = tokenizer.vocab_size
    model = Bigram(vocab).to(torch.bfloat16)
    texts = ["the cat sat on the mat and looked at the dog for a while"] * 4
    for chunk_size in (3, 7):
        task = mm.HeldOutLoss(texts, tokenizer, batch_size=4, chunk_size=chunk_size)
        with LargestFloat32() as seen:
            value = task(model)
        assert 0 < seen.numel <= chunk_size * vocab < task.num_tokens * vocab  # one chunk, far below the batch's logits
        assert value == pytest.approx(mm.HeldOutLoss(texts, tokenizer, batch_size=1, chunk_size=1)(model), rel=1e-6)
    # fp32 logits, rows skipped inside a chunk: by hand, and the caller's logits are left as they were
    logits = torch.randn(6, 5)
    kept = logits.clone()
    targets = torch.tensor([1, -1, 3, 0, -1, 2])
    expected = sum(float(torch.logsumexp(logits[i].double(), 0) - logits[i, t].double()) for i, t in enumerate(targets.tolist()) if t >= 0)
    for chunk_size in (1, 4, 6):
        assert float(chunked_cross_entropy(logits, targets, chunk_size=chunk_size)) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(logits, kept)
