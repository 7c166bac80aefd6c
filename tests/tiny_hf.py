"""Tiny random-init Hugging Face models shared by the tests (built from configs, no download)."""

from __future__ import annotations

import torch


def llama(seed: int = 11, vocab_size: int = 96):
    """A 2-layer Llama-style causal LM, width 32, grouped-query attention (4 heads, 2 kv)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def bert(seed: int = 12, vocab_size: int = 96, num_labels: int = 3):
    """A 2-layer BERT-style sequence classifier, width 32, dropout off."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


# One batch and the matching forward/loss functions, for conformance checks on the models above.
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 2])


def logits(model, ids):
    """The model's output logits for ``ids``."""
    return model(input_ids=ids).logits


def llama_loss(model, ids):
    """Next-token loss of a causal LM on ``ids``."""
    return model(input_ids=ids, labels=ids).loss


def bert_loss(model, ids):
    """Classification loss of the sequence classifier on ``ids`` with :data:`LABELS`."""
    return model(input_ids=ids, labels=LABELS).loss
