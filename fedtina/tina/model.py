"""The Tina network: a DiT-style transformer over parameter tokens, conditioned per token on its class's prompt.

Input ``x`` [B, N, token_dim] holds ``G`` global tokens (see `ParamLayout`; none by default) followed by one token per
class. There is **no positional encoding**: class tokens are told apart only by their content and their prompt
conditioning, so the network is permutation-equivariant over classes by construction. Global tokens carry a learned
type embedding instead (they are not interchangeable).

A class's prompt (`fedtina.tina.prompt`: its name's text embedding, the mean feature of example images, or both,
with presence flags) is one vector. Conditioning of token i = TimestepEmbedder(t) + PromptEmbedder(prompt_i) (global
tokens: a learned type vector + the masked mean of the set's prompts), fed to every block through adaLN-Zero (per
token shift/scale/gate, zero-initialised, so every block starts as the identity). The prompt is also added to the
token input. Self-attention runs
across the tokens with a key padding mask, so padded tokens never influence valid ones; their outputs are garbage
and ignored by the loss and the sampler.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> vector: sinusoidal features then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class PromptEmbedder(nn.Module):
    """Per-class prompt vector -> conditioning vector (2-layer MLP)."""

    def __init__(self, prompt_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(prompt_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.mlp(prompt)


class Attention(nn.Module):
    """Multi-head self-attention with a boolean key mask (True = a real token that may be attended to)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TinaBlock(nn.Module):
    """Pre-norm transformer block with per-token adaLN-Zero conditioning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), key_mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift/scale) then a linear map back to the token width; zero-initialised."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TinaNet(nn.Module):
    """Denoiser over parameter tokens.

    ``forward(x [B,N,T], t [B], prompt [B,N,P], mask [B,N] bool) -> [B,N,T]``: the first ``num_global_tokens`` of
    the N tokens are global tokens (their ``prompt`` rows are ignored), the rest are class tokens. ``mask`` is True for real
    tokens; global tokens must always be real. The output is the prediction target of the diffusion (x0 by default,
    see `fedtina.tina.diffusion`).
    """

    def __init__(
        self,
        token_dim: int,
        prompt_dim: int,
        d_model: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_global_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.token_dim, self.prompt_dim, self.num_global_tokens = token_dim, prompt_dim, num_global_tokens
        self.x_embed = nn.Linear(token_dim, d_model)
        self.prompt_in = nn.Linear(prompt_dim, d_model)      # prompt added to the token input
        self.t_embedder = TimestepEmbedder(d_model)
        self.prompt_embedder = PromptEmbedder(prompt_dim, d_model)  # prompt -> per-token conditioning
        if num_global_tokens:
            self.global_type = nn.Parameter(torch.zeros(num_global_tokens, d_model))   # input type embedding
            self.global_cond = nn.Parameter(torch.zeros(num_global_tokens, d_model))   # conditioning type embedding
        self.blocks = nn.ModuleList(TinaBlock(d_model, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(d_model, token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        for emb in (self.t_embedder.mlp, self.prompt_embedder.mlp):
            nn.init.normal_(emb[0].weight, std=0.02)
            nn.init.normal_(emb[2].weight, std=0.02)
        if self.num_global_tokens:
            nn.init.normal_(self.global_type, std=0.02)
            nn.init.normal_(self.global_cond, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer starts at 0 (= the zoo's mean token)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        G = self.num_global_tokens
        mask = mask.bool()
        prompt = prompt * mask[..., None].to(prompt.dtype)        # padded rows contribute nothing anywhere
        t_emb = self.t_embedder(t)[:, None, :]
        h = self.x_embed(x)
        h_in, c = self.prompt_in(prompt[:, G:]), self.prompt_embedder(prompt[:, G:])
        if G:
            cls_mask = mask[:, G:, None].to(prompt.dtype)
            set_prompt = (prompt[:, G:] * cls_mask).sum(1) / cls_mask.sum(1).clamp_min(1.0)   # [B, P], order-free
            g_cond = self.prompt_embedder(set_prompt)[:, None, :] + self.global_cond[None]
            h_in = torch.cat([self.global_type[None].expand(len(x), -1, -1), h_in], dim=1)
            c = torch.cat([g_cond.expand(-1, G, -1), c], dim=1)
        h = h + h_in
        c = c + t_emb
        for block in self.blocks:
            h = block(h, c, mask)
        return self.final_layer(h, c)
