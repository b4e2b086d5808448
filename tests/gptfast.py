"""A small decoder written without transformers, in the style of gpt-fast, for the graph-pass tests.

``KVCache`` is preallocated with ``register_buffer`` and written with ``cache[:, :, input_pos] = x``; GQA uses
``repeat_interleave``; the causal mask is a boolean buffer indexed by ``input_pos``. Variants: ``cache="cat"``
(a hand-written ``torch.cat`` cache passed in and returned), and ``mask="sliding"`` / ``dropout`` / a
cross-attention block, which the pass must decline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on ``x [B, H, T, D]`` at positions ``pos [T]``."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, head_dim))
        self.slice_writes = False
        self.next_pos = 0

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slice_writes:  # slice assignment at Python-int positions (graphs specialise on the start)
            start = self.next_pos
            self.next_pos = start + k.shape[2]
            self.k_cache[:, :, start : self.next_pos] = k
            self.v_cache[:, :, start : self.next_pos] = v
            return self.k_cache[:, :, : self.next_pos], self.v_cache[:, :, : self.next_pos]
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, batch: int, *, dropout: float = 0.0,
                 cross: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.h, self.hkv, self.hd = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.hd, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache = KVCache(batch, kv_heads, max_len, self.hd)
        self.dropout, self.cross = dropout, cross
        self.layer_idx = 0
        # the independent reference for the tests: the eager progressive cache + pmkvq attention (cache.py)
        self.reference_cache = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor, memory: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):  # fmt: skip
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.h, self.hd).transpose(1, 2)
        src = memory if self.cross and memory is not None else x
        k = self.wk(src).view(b, src.shape[1], self.hkv, self.hd).transpose(1, 2)
        v = self.wv(src).view(b, src.shape[1], self.hkv, self.hd).transpose(1, 2)
        if self.cross:  # attends to an encoder memory: no cache, no mask
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.wo(y.transpose(1, 2).reshape(b, t, -1)), None
        q, k = rope(q, input_pos), rope(k, input_pos)
        if self.reference_cache is not None:
            from pmkvq_compile.attention import pmkvq_attention_forward

            kn, vn = self.reference_cache.update(k, v, self.layer_idx)
            y, _ = pmkvq_attention_forward(self, q, kn, vn, None)
            return self.wo(y.reshape(b, t, -1)), None
        if past is not None:  # hand-written torch.cat cache
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
            new_past = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        else:
            new_past = None
            k, v = self.kv_cache.update(input_pos, k, v)
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
            if self.kv_cache.slice_writes:  # K/V are the cache's prefix: causal needs no mask
                y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1)), new_past


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, batch: int, **kw) -> None:
        super().__init__()
        self.attention = Attention(dim, heads, kv_heads, max_len, batch, **kw)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask, input_pos, memory=None, past=None):
        a, new_past = self.attention(self.norm1(x), mask, input_pos, memory, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), new_past


class Transformer(nn.Module):
    """``forward(idx [B, T], input_pos [T]) -> logits [B, T, vocab]`` (``past=`` for the cat-cache variant)."""

    def __init__(self, vocab: int = 64, dim: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 max_len: int = 128, batch: int = 1, mask: str = "causal", dropout: float = 0.0,
                 cross_layer: int | None = None, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            [
                Block(dim, heads, kv_heads, max_len, batch, dropout=dropout, cross=(i == cross_layer))
                for i in range(layers)
            ]
        )
        for i, blk in enumerate(self.layers):
            blk.attention.layer_idx = i
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        if mask == "sliding":
            causal &= ~torch.tril(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=-8)
        self.register_buffer("causal_mask", causal)
        self.geometry = dict(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim // heads,
                             hidden_size=dim, max_position_embeddings=max_len)  # fmt: skip

    def use_reference_cache(self, cache) -> None:
        """Route attention through the eager progressive cache (``None`` restores the float cache)."""
        for blk in self.layers:
            blk.attention.reference_cache = cache

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, memory: torch.Tensor | None = None):
        x = self.tok(idx)
        mask = self.causal_mask[None, None, input_pos]
        for layer in self.layers:
            x, _ = layer(x, mask, input_pos, memory)
        return self.out(self.norm(x))

    def forward_cat(
        self, idx: torch.Tensor, input_pos: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]
    ):
        """The cat-cache variant: returns ``(logits, new_past)``."""
        x = self.tok(idx)
        new = []
        for layer, p in zip(self.layers, past):
            x, np_ = layer(x, None, input_pos, None, p)
            new.append(np_)
        return self.out(self.norm(x)), new
