"""Decoder-only transformers (nanoGPT style) with an optional causal Soft MoE (docs/design.md §8).

    from softmoe.models.gpt import create_decoder
    model = create_decoder("soft_moe_gpt_micro")             # CausalSoftMoE in the last half of the blocks
    logits = model(idx)                                      # idx (B, T) int64 -> (B, T, V)
    out = model.generate(prompt, max_new_tokens=100)         # KV cache + the layer's bounded state

Pre-LN blocks, causal attention (`F.scaled_dot_product_attention(is_causal=True)`), learned
positions, a head tied to the token embedding or not. The zoo's names come from one table
(`DECODER_FAMILIES` x `DECODER_SIZES`), in the config style of the ViTs (a dataclass with
`replace` / `to_dict` / `from_dict`). Checkpoints: `save_pretrained` / `from_pretrained`
(safetensors + JSON, written atomically).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softmoe._io import atomic_write, atomic_write_text
from softmoe.layers import CausalSoftMoE, MoELayer, SoftMoE
from softmoe.layers.common import check_choice, check_positive_int

from .config import moe_block_indices

# moe_type -> layer. "SoftMoE" is the plain (leaky) layer, kept as the canary that the
# prefix-only evaluation must catch; it cannot decode step by step.
DECODER_MOE = {"CausalSoftMoE": CausalSoftMoE, "SoftMoE": SoftMoE}
FORMAT, FORMAT_VERSION, ARCHITECTURE = "softmoe", 1, "gpt"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass(frozen=True)
class GPTConfig:
    name: str = "gpt_micro"
    vocab_size: int = 256  # bytes: any text file works, with no vocabulary to save
    block_size: int = 128  # context length (learned positions)
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 2
    mlp_dim: int = 256  # dense MLP width; also the experts' hidden width
    tie_head: bool = True  # head weight = token embedding (nanoGPT); False: a separate head
    moe_type: str | None = None  # None (dense), "CausalSoftMoE", or "SoftMoE" (the leaky canary)
    num_experts: int = 4
    slots_per_expert: int = 1
    chunk_size: int | None = None  # None: E*P (slots = tokens: the dense MLP's expert FLOPs)
    rotate: bool = True  # rotate slot anchors between chunks (docs/design.md §8.4); False = ablation
    moe_placement: str = "last_half"  # as the ViTs (models/config.py moe_block_indices)

    def __post_init__(self) -> None:
        for f in ("vocab_size", "block_size", "embed_dim", "depth", "num_heads", "mlp_dim", "num_experts",
                  "slots_per_expert"):
            check_positive_int(f, getattr(self, f))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.moe_type is not None:
            check_choice("moe_type", self.moe_type, DECODER_MOE)
        if self.chunk_size is not None:
            check_positive_int("chunk_size", self.chunk_size)
        moe_block_indices(self.moe_placement, self.depth)

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        return () if self.moe_type is None else moe_block_indices(self.moe_placement, self.depth)

    def replace(self, **changes) -> GPTConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {sorted(unknown)}; fields: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return cls().replace(**d)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        return [t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def step(self, x_t: torch.Tensor, cache: dict, t: int) -> torch.Tensor:
        """x_t (B, D) at position t; cache {"k", "v"}: (B, H, block_size, hd), filled up to t."""
        B, D = x_t.shape
        q, k, v = self.heads(x_t.unsqueeze(1))  # (B, H, 1, hd)
        cache["k"][:, :, t:t + 1] = k
        cache["v"][:, :, t:t + 1] = v
        y = F.scaled_dot_product_attention(q, cache["k"][:, :, :t + 1], cache["v"][:, :, :t + 1])
        return self.proj(y.reshape(B, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, moe: bool) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = CausalSelfAttention(D, cfg.num_heads)
        if not moe:
            self.mlp = Mlp(D, cfg.mlp_dim)
        elif cfg.moe_type == "CausalSoftMoE":
            self.mlp = CausalSoftMoE(D, cfg.num_experts, cfg.slots_per_expert, chunk_size=cfg.chunk_size,
                                     hidden_dim=cfg.mlp_dim, rotate=cfg.rotate)
        else:
            self.mlp = SoftMoE(D, cfg.num_experts, cfg.slots_per_expert, hidden_dim=cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x_t: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # (B, D)
        x_t = x_t + self.attn.step(self.ln1(x_t), cache, t)
        h = self.ln2(x_t)
        if isinstance(self.mlp, CausalSoftMoE):
            y, cache["moe"] = self.mlp.step(h, cache["moe"])
        elif isinstance(self.mlp, SoftMoE):
            raise ValueError("a plain SoftMoE decoder is not causal and cannot decode step by step "
                             "(moe_type='SoftMoE' is the leak canary; use 'CausalSoftMoE')")
        else:
            y = self.mlp(h)
        return x_t + y


class GPT(nn.Module):
    """forward(idx (B, T) int64, T <= block_size) -> logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.block_size, cfg.embed_dim))
        moe = set(cfg.moe_blocks)
        self.blocks = nn.ModuleList(Block(cfg, i in moe) for i in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_head:
            self.head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """nanoGPT: N(0, 0.02) for embeddings and dense linears, zero biases, residual
        projections scaled by 1/sqrt(2*depth); MoE layers keep their own initialisation."""
        if self.pos_emb.is_meta:
            return
        moe_params = {id(p) for m in self.modules() if isinstance(m, MoELayer) for p in m.parameters()}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if id(p) in moe_params or p.dim() < 2:
                    continue
                std = 0.02 / math.sqrt(2 * self.config.depth) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            for m in self.modules():
                if isinstance(m, nn.Linear) and m.bias is not None and id(m.bias) not in moe_params:
                    m.bias.zero_()

    def check_idx(self, idx: torch.Tensor) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2:
            got = (idx.dtype, tuple(idx.shape)) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an int64 tensor of shape (batch, tokens), got {got}")
        if not 1 <= idx.shape[1] <= self.config.block_size:
            raise ValueError(f"idx must have 1..block_size={self.config.block_size} tokens, got {idx.shape[1]}")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_idx(idx)
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb[:T]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)

    def save_pretrained(self, directory) -> Path:
        """`save_pretrained(self, directory)` (config.json + model.safetensors, atomically)."""
        return save_pretrained(self, directory)

    # -- generation -----------------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> dict:
        """Per block: the attention KV cache (B, H, block_size, hd) and the MoE decoding state."""
        cfg, p = self.config, self.pos_emb
        hd = cfg.embed_dim // cfg.num_heads
        shape = (batch_size, cfg.num_heads, cfg.block_size, hd)
        blocks = []
        for b in self.blocks:
            c = {"k": p.new_zeros(shape), "v": p.new_zeros(shape)}
            if isinstance(b.mlp, CausalSoftMoE):
                c["moe"] = b.mlp.init_state(batch_size)
            blocks.append(c)
        return {"t": 0, "blocks": blocks}

    @torch.no_grad()
    def step(self, idx_t: torch.Tensor, cache: dict) -> torch.Tensor:
        """Next-token logits (B, V) after token idx_t (B,) at position cache["t"] (< block_size)."""
        t = cache["t"]
        if t >= self.config.block_size:
            raise ValueError(f"the cache is full (block_size={self.config.block_size}); start a new one")
        x = self.tok_emb(idx_t) + self.pos_emb[t]  # (B, D)
        for block, c in zip(self.blocks, cache["blocks"]):
            x = block.step(x, c, t)
        cache["t"] = t + 1
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` after the prompt idx (B, T0) with the KV cache and the MoE
        layers' bounded state. When the context fills, the cache restarts from the last
        block_size // 2 tokens. temperature 0 = greedy."""
        check_positive_int("max_new_tokens", max_new_tokens, minimum=0)
        self.check_idx(idx)
        out = idx
        cache, logits = self.prime(idx)
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
            if cache["t"] >= self.config.block_size:
                cache, logits = self.prime(out[:, -(self.config.block_size // 2):])
            else:
                logits = self.step(nxt, cache)
        return out

    def prime(self, idx: torch.Tensor):
        cache = self.init_cache(idx.shape[0])
        for t in range(idx.shape[1]):
            logits = self.step(idx[:, t], cache)
        return cache, logits


# -- the zoo: one table ---------------------------------------------------------------------------
DECODER_SIZES = {"micro": dict(block_size=128, embed_dim=64, depth=4, num_heads=2, mlp_dim=256)}
DECODER_FAMILIES = {"gpt": None, "soft_moe_gpt": "CausalSoftMoE"}
DECODER_CONFIGS = {f"{fam}_{size}": GPTConfig(name=f"{fam}_{size}", moe_type=moe, **dims)
                   for fam, moe in DECODER_FAMILIES.items() for size, dims in DECODER_SIZES.items()}


def list_decoders() -> list[str]:
    return list(DECODER_CONFIGS)


def get_decoder_config(name: str, /, **overrides) -> GPTConfig:
    if name not in DECODER_CONFIGS:
        raise ValueError(f"unknown decoder name {name!r}; one of {list_decoders()}")
    return DECODER_CONFIGS[name].replace(**overrides)


def create_decoder(name: str, /, **overrides) -> GPT:
    """e.g. `create_decoder("soft_moe_gpt_micro", num_experts=8, chunk_size=16)`."""
    return GPT(get_decoder_config(name, **overrides))


# -- checkpoints ------------------------------------------------------------------------------------
def save_pretrained(model: GPT, directory) -> Path:
    """Write config.json + model.safetensors into `directory` (atomically, each)."""
    from safetensors.torch import save_file

    if not isinstance(model, GPT):
        raise ValueError(f"model must be a softmoe GPT, got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} is a file; save_pretrained writes a folder")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
           "config": model.config.to_dict()}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if not (model.config.tie_head and k == "head.weight")}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return directory


def from_pretrained(directory, device=None) -> GPT:
    """The GPT saved by `save_pretrained` in `directory` (never unpickles)."""
    directory = Path(directory) if isinstance(directory, (str, os.PathLike)) else None
    if directory is None or not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(f"checkpoint must be a folder with {CONFIG_NAME} and {WEIGHTS_NAME} "
                         f"(written by save_pretrained), got {directory}")
    try:
        doc = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{directory / CONFIG_NAME} is not a softmoe GPT config "
                         f"(expected format {FORMAT!r}, architecture {ARCHITECTURE!r})")
    model = load_weights(GPT(GPTConfig.from_dict(doc["config"])), directory)
    return model.to(device) if device is not None else model


def load_weights(model: GPT, directory) -> GPT:
    """Load `directory`'s model.safetensors into `model` (strict: the same keys and shapes;
    a tied head is re-tied to the token embedding). Used by from_pretrained and the LM resume."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if model.config.tie_head:
        if "tok_emb.weight" not in state:
            raise ValueError(f"{str(path)!r} has no tok_emb.weight: not a softmoe GPT checkpoint")
        state["head.weight"] = state["tok_emb.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{str(path)!r} does not fit this GPT ({model.config.name}): {e}") from e
    return model
