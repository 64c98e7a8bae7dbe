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
    """A causal LM whose logits at a position depend on that token only: a table row."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table(input_ids))


TEXTS = ["the cat sat on the mat", "a much longer sentence about dogs, cats and other animals", "ok"]


def hand_loss(model, tokenizer, texts, max_length):
    nll, count = 0.0, 0
    table = model.table.weight.detach().double()
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        for t in range(len(ids) - 1):
            row = table[ids[t]]
            nll += float(torch.logsumexp(row, 0) - row[ids[t + 1]])
            count += 1
    return nll / count


@pytest.mark.parametrize("max_length, batch_size", [(64, 2), (5, 3), (64, 1)])
def test_held_out_loss_equals_hand_computation(tokenizer, max_length, batch_size):
    model = Bigram(tokenizer.vocab_size)
    expected = hand_loss(model, tokenizer, TEXTS, max_length)
    task = mm.HeldOutLoss(TEXTS, tokenizer, max_length=max_length, batch_size=batch_size)
    assert task(model) == pytest.approx(expected, rel=1e-6)
    assert mm.HeldOutLoss(TEXTS, tokenizer, max_length=max_length, perplexity=True)(model) == pytest.approx(math.exp(expected), rel=1e-6)
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
