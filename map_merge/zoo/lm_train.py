"""Training pieces of the language-model zoo: a byte-level BPE tokenizer, packed token streams,
a Llama pretrained from scratch, and domain experts (full fine-tunes or PEFT LoRA adapters).

Everything is seeded: the same texts, settings and seed give the same weights on the same
machine and thread count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "pack", "llama_config", "train_lm", "LORA_TARGETS"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer trained on ``texts`` (digits split one per token), wrapped as a
    ``PreTrainedTokenizerFast`` with ``<s>`` (prepended to every text), ``</s>`` and ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=int(max_length))


def pack(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """``(N, seq_len)`` token ids: the texts as ``<s> text </s>``, concatenated and cut into rows
    (the last partial row is dropped)."""
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = np.fromiter((t for row in ids for t in (bos, *row, eos)), dtype=np.int64)
    rows = len(stream) // int(seq_len)
    if rows < 1:
        raise ValueError(f"{len(texts)} texts give {len(stream)} tokens, fewer than one row of {seq_len}")
    return torch.from_numpy(stream[: rows * seq_len].reshape(rows, seq_len).copy())


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, ffn: int, max_length: int, tokenizer: Any):
    """A small ``LlamaConfig`` (untied embeddings, multi-head attention) for ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=int(vocab_size), hidden_size=int(hidden), intermediate_size=int(ffn), num_hidden_layers=int(layers),
                       num_attention_heads=int(heads), num_key_value_heads=int(heads), max_position_embeddings=int(max_length),
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0)


def _learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_lm(
    model: nn.Module,
    streams: Sequence[torch.Tensor],
    weights: Sequence[float],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    floor: float = 0.1,
    device: str | torch.device = "cpu",
    desc: str = "training",
    progress: bool = True,
) -> list[float]:
    """Train the trainable parameters of a causal LM (in place) with AdamW on next-token
    cross-entropy: ``steps`` batches of ``batch_size`` rows, each row drawn from stream ``i``
    (``(N_i, L)`` packed ids) with probability ``weights[i]``. Learning rate: linear warm-up over
    ``warmup`` of the steps, cosine decay to ``floor * lr``; gradients clipped at norm 1.
    Returns the loss per step."""
    from tqdm.auto import tqdm

    if len(streams) != len(weights) or not streams:
        raise ValueError(f"got {len(streams)} streams and {len(weights)} weights")
    generator = torch.Generator().manual_seed(int(seed))
    probs = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if (probs < 0).any() or float(probs.sum()) <= 0:
        raise ValueError(f"stream weights must be non-negative and not all zero, got {list(weights)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}] + ([{"params": other, "weight_decay": 0.0}] if other else [])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **fused)
    warm = max(1, int(round(warmup * steps)))
    losses = []
    was_training = model.training
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for step in range(steps):
            which = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
            rows = [streams[int(s)][int(torch.randint(len(streams[int(s)]), (1,), generator=generator))] for s in which]
            ids = torch.stack(rows).to(device)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr, warm, floor)
            logits = model(input_ids=ids).logits[:, :-1]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.train(was_training)
    return losses
