"""Graph wrappers every family shares."""

from __future__ import annotations

import torch
from torch import nn


class EmbedTokens(nn.Module):
    """input_ids → the text model's token embeddings (the embed_tokens graph)."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)
