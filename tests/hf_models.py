"""Tiny Hugging Face language models' shared pieces for the transformer tests: sizes, token batches, a
logits-only wrapper. Plain values only: importing this needs no ``transformers``."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 100
BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
}
"""Every tiny config's sizes: 4 heads of 16, MLP 128, 2 layers."""
GQA = {**BASE, "num_key_value_heads": 2}
GPT2 = {
    "vocab_size": VOCAB,
    "n_embd": 64,
    "n_head": 4,
    "n_inner": 128,
    "n_layer": 2,
    "n_positions": 32,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
OPT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_dim": 128,
    "num_hidden_layers": 2,
    "word_embed_proj_dim": 64,
    "max_position_embeddings": 32,
}
VISION = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
}
"""A tiny vision transformer's sizes (BASE's, over 16 patches of 32 x 32 images)."""
T5 = {"vocab_size": VOCAB, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4, "num_layers": 2}
BLOOM = {"vocab_size": VOCAB, "hidden_size": 64, "n_head": 4, "n_layer": 2}


class LogitsOnly(nn.Module):
    """A user's wrapper returning only the logits (T5 also returns the encoder's hidden states,
    which would tie the residual width to the output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


def tokens(batch: int, length: int, seed: int, decoder: bool = False) -> dict[str, torch.Tensor]:
    """Token ids with the last row's final two positions padded (``decoder``: T5's decoder ids, no mask)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    if decoder:
        return {
            "input_ids": ids,
            "decoder_input_ids": torch.randint(0, VOCAB, (batch, length - 2), generator=generator),
        }
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pixels(batch: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """``pixel_values``: ``batch`` random 3-channel ``size`` x ``size`` images."""
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))}
