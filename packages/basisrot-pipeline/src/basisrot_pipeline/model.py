"""A nanoGPT-style decoder (untied head, ReLU MLP 4x, LayerNorm) and its split into pipeline stages.

The architecture is the one the paper trains (arXiv 2602.03515, Section 5; Karpathy's nanoGPT
with a ReLU MLP and an untied LM head). :func:`partition_model` cuts it into P contiguous stages
balanced by parameter count: stage 0 also holds the embeddings, the last stage the final norm and
the head, every stage at least one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder size. (Defaults: a 4-layer, d=128 byte-level model.)"""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_out(F.relu(self.fc(self.ln_2(x))))


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Embedding(config.block_size, config.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(positions)


class Head(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class Stage(nn.Module):
    """A contiguous slice of the decoder: optional embedding, some blocks, optional head."""

    def __init__(self, embedding: Embedding | None, blocks: list[Block], head: Head | None) -> None:
        super().__init__()
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head = Head(config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embedding(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_split(sizes: list[int], num_parts: int) -> list[int]:
    """Cut points of ``sizes`` into ``num_parts`` contiguous non-empty parts minimising the largest sum.

    Returns the start index of every part (exact dynamic programme; sizes are a few dozen blocks).
    """
    n = len(sizes)
    if num_parts > n:
        raise ValueError(f"cannot split {n} layers into {num_parts} stages: more stages than layers")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[k][i]: smallest max-part-sum splitting the first i items into k parts; arg: last cut.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    arg = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0
    for k in range(1, num_parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], arg[k][i] = cost, j
    starts, i = [], n
    for k in range(num_parts, 0, -1):
        i = arg[k][i]
        starts.append(i)
    return starts[::-1]


def partition_model(model: GPT, num_stages: int) -> list[Stage]:
    """Split ``model`` into ``num_stages`` stages sharing its modules, balanced by parameter count."""
    n_layer = len(model.blocks)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if num_stages > n_layer:
        raise ValueError(f"num_stages ({num_stages}) is larger than the number of layers ({n_layer})")
    sizes = [_num_params(block) for block in model.blocks]
    sizes[0] += _num_params(model.embedding)
    sizes[-1] += _num_params(model.head)
    starts = [*balanced_split(sizes, num_stages), n_layer]
    stages = []
    for s in range(num_stages):
        blocks = list(model.blocks[starts[s] : starts[s + 1]])
        stages.append(Stage(model.embedding if s == 0 else None, blocks, model.head if s == num_stages - 1 else None))
    return stages
