"""What decides a language-model zoo's weights (with the seed and the texts): :class:`LMZooSettings`,
and the settings of the sizes :func:`~map_merge.zoo.lm.load_lm_zoo` builds (:data:`LM_SIZES`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LMZooSettings", "LM_SIZES"]


@dataclass(frozen=True)
class LMZooSettings:
    """Everything that decides a zoo's weights (with the seed and the texts): a size of
    :data:`LM_SIZES`, or your own for ``load_lm_zoo(size=...)`` (formerly ``LMRecipe``).

    Model: ``vocab_size``, ``hidden``, ``layers``, ``heads``, ``ffn``; ``max_length`` tokens per
    training row and per held-out text. Pretraining: ``pretrain_steps`` batches of
    ``batch_size`` rows at peak ``pretrain_lr``, rows drawn from the corpora
    (:data:`~map_merge.zoo.lm_data.CORPORA`: general prose and the expert domains) by ``mix``.
    Experts: ``kinds`` (domain -> ``"full"`` or ``"lora"``), ``expert_steps`` at ``expert_lr``
    (full) or ``lora_lr`` with rank ``lora_rank``. Data: ``max_chars`` training characters per
    domain, ``tokenizer_chars`` of them train the tokenizer; ``val_texts`` / ``test_texts``
    held-out texts per domain; ``choice_val`` / ``choice_test`` lm-eval questions per domain.
    ``shard_size``: the full fine-tunes' safetensors shard size."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_length: int
    batch_size: int
    pretrain_steps: int
    expert_steps: int
    pretrain_lr: float = 3e-3
    expert_lr: float = 2e-3
    lora_lr: float = 5e-3
    lora_rank: int = 16
    mix: tuple[tuple[str, float], ...] = (("prose", 0.5), ("code", 0.125), ("medical", 0.125), ("legal", 0.125), ("arithmetic", 0.125))
    kinds: tuple[tuple[str, str], ...] = (("code", "full"), ("medical", "lora"), ("legal", "full"), ("arithmetic", "lora"))
    max_chars: int = 1_500_000
    tokenizer_chars: int = 300_000
    val_texts: int = 32
    test_texts: int = 128
    choice_val: int = 100
    choice_test: int = 300
    shard_size: str = "300KB"


LM_SIZES: dict[str, LMZooSettings] = {
    "tiny": LMZooSettings(vocab_size=384, hidden=32, layers=2, heads=2, ffn=64, max_length=64, batch_size=8, pretrain_steps=40,
                          expert_steps=25, lora_rank=4, max_chars=60_000, tokenizer_chars=20_000, val_texts=6, test_texts=6,
                          choice_val=12, choice_test=12, shard_size="20KB"),
    "small": LMZooSettings(vocab_size=2048, hidden=64, layers=4, heads=4, ffn=192, max_length=128, batch_size=16, pretrain_steps=640,
                           expert_steps=120, shard_size="300KB"),
    "large": LMZooSettings(vocab_size=8192, hidden=512, layers=8, heads=8, ffn=1376, max_length=256, batch_size=32, pretrain_steps=4000,
                           expert_steps=800, pretrain_lr=1e-3, expert_lr=2e-4, lora_lr=1e-3, max_chars=6_000_000, tokenizer_chars=1_000_000,
                           val_texts=64, test_texts=256, choice_test=500, shard_size="20MB"),
}

