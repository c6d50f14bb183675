"""Model registry: names -> model builders, generated from the size tables below.

Names: `{family}_{size}{patch}`, family in vit / soft_moe / tc_moe / ec_moe, size in
ti / s / b / l / h, patch in 32 / 16 / 14 / 8 (e.g. `vit_s16`, `soft_moe_h14`), plus the
CPU-sized `*_micro` models. `create_model(name, **overrides)` builds one; every
`ViTConfig` field is an override (`img_size`, `num_classes`, `moe={"num_experts": 256}`, ...).

Default expert counts (paper Table 8): 128 experts, except S/14 which uses 256 (the paper's
Soft MoE-S/14 and its Table 2 ablations), and never more experts than tokens at 224 px
(rounded down to a power of two): the /32 models (49 tokens) get 32 experts, so Experts
Choice has a capacity of at least one token (the paper: experts ~ tokens works best).
`moe={"num_experts": 256}` (or the legacy `num_experts=256`) on `soft_moe_h14` gives the
54B model of Table 8.

Heads: 1000 classes by default (10 for the micro models); the paper's Table 8 counts use
`num_classes=29593` (JFT).

Decoders (task "lm", softmoe/models/gpt.py): `gpt_micro` and `soft_moe_gpt_micro`, generated
from that module's table (`DECODER_FAMILIES` x `DECODER_SIZES`) and registered here too, so
`create_model`, `get_config` (a GPTConfig) and `profile_model` take their names. Every name
has a task; `list_models` lists the vision models unless asked (`task="lm"` or `task=None`
for all), so vision-only consumers (timm registration, the vision compare) never meet a GPT.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from .config import MoEConfig, ViTConfig
from .gpt import DECODER_CONFIGS, GPT, GPTConfig
from .vit import VisionTransformer, build_model

# size -> (embed_dim, depth, mlp_dim, num_heads), docs/design.md §3.
SIZES = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
}
PATCHES = (32, 16, 14, 8)
# family prefix -> moe_type (None = dense ViT).
FAMILIES = {"vit": None, "soft_moe": "SoftMoE", "tc_moe": "TokensChoiceMoE", "ec_moe": "ExpertsChoiceMoE"}
DEFAULT_EXPERTS = 128
EXPERTS_OVERRIDE = {("s", 14): 256}  # (size, patch) -> experts, where the paper differs
MICRO = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=4, num_heads=2,
             mlp_dim=256)
MICRO_EXPERTS = 8

_REGISTRY: dict[str, Callable[..., VisionTransformer]] = {}
_CONFIGS: dict[str, ViTConfig | GPTConfig] = {}
_TASKS: dict[str, str] = {}  # name -> "classify" (vision) or "lm" (decoders)
TASKS = ("classify", "lm")


def register_model(fn=None, *, name: str | None = None, config: ViTConfig | GPTConfig | None = None,
                   task: str = "classify"):
    """Register `fn(**overrides) -> model` under `name` (default: fn.__name__).

    Use as `@register_model` or `@register_model(name=..., config=...)`; `config` (the
    default config) lets `get_config` and the CLI count the model without building it.
    `task`: "classify" (a ViT) or "lm" (a decoder). Registering a name twice is a ValueError.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def wrap(f):
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = f
        _TASKS[key] = task
        if config is not None:
            _CONFIGS[key] = config
        return f

    return wrap if fn is None else wrap(fn)


def list_models(pattern: str = "*", task: str | None = "classify") -> list[str]:
    """Registered names matching the shell-style `pattern`, in table order (family, size,
    patch; micro models first). `task`: "classify" (the default: the vision models), "lm"
    (the decoders) or None (every model)."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a str such as 'soft_moe_*', got {pattern!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None (all), got {task!r}")
    return [n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern.lower()) and task in (None, _TASKS[n])]


def model_task(name: str) -> str:
    """"classify" or "lm" for a registered name (unknown: ValueError with suggestions)."""
    _lookup(name)
    return _TASKS[name]


def _lookup(name: str):
    if not isinstance(name, str):
        raise ValueError(f"model name must be a str (see `softmoe models` for the list), got {name!r}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `softmoe models` for the list"
        raise ValueError(f"unknown model name {name!r}{hint}")
    return _REGISTRY[name]


def apply_overrides(cfg, overrides: dict):
    """`cfg` with `overrides` applied (see `ViTConfig.replace`: ViTConfig fields, `moe` as a
    MoEConfig / None / dict of MoEConfig fields, or the legacy moe_type, num_experts,
    moe_placement, moe_kwargs). A None value means "keep the default" for every key except
    `moe` and `moe_type` (None: dense), so `img_size=args.img_size` passes unset CLI flags.
    A GPTConfig takes its own fields (`GPTConfig.replace`), None again meaning the default."""
    if isinstance(cfg, GPTConfig):
        return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None or k in ("moe", "moe_type")})


def get_config(name: str, /, **overrides) -> ViTConfig | GPTConfig:
    """The config `create_model(name, **overrides)` would build, without building it."""
    fn = _lookup(name)
    if name in _CONFIGS:
        return apply_overrides(_CONFIGS[name], overrides)
    import torch

    with torch.device("meta"):
        return fn(**overrides).config


def create_model(name: str, /, **overrides):
    """Build the registered model `name` with `overrides` (see `apply_overrides`), e.g.
    `create_model("soft_moe_s16", num_classes=10, moe={"num_experts": 32})` or
    `create_model("soft_moe_gpt_micro", num_experts=8, chunk_size=8)` (a GPT)."""
    return _lookup(name)(**overrides)


def _config_builder(cfg: ViTConfig | GPTConfig):
    def build(**overrides):
        resolved = apply_overrides(cfg, overrides)
        return GPT(resolved) if isinstance(resolved, GPTConfig) else build_model(resolved)

    return build


def default_experts(size: str, patch: int, img_size: int = 224) -> int:
    """The documented default expert count (see the module docstring)."""
    tokens = (img_size // patch) ** 2
    return min(EXPERTS_OVERRIDE.get((size, patch), DEFAULT_EXPERTS), 1 << (tokens.bit_length() - 1))


def _register_tables() -> None:
    for family, moe_type in FAMILIES.items():
        moe = None if moe_type is None else MoEConfig(moe_type, MICRO_EXPERTS)
        name = f"{family}_micro"
        cfg = ViTConfig(**MICRO, moe=moe, name=name)
        register_model(_config_builder(cfg), name=name, config=cfg)
    for family, moe_type in FAMILIES.items():
        for size, (dim, depth, mlp, heads) in SIZES.items():
            for patch in PATCHES:
                name = f"{family}_{size}{patch}"
                moe = None if moe_type is None else MoEConfig(moe_type, default_experts(size, patch))
                cfg = ViTConfig(patch_size=patch, embed_dim=dim, depth=depth, mlp_dim=mlp, num_heads=heads,
                                moe=moe, name=name)
                register_model(_config_builder(cfg), name=name, config=cfg)
    for name, cfg in DECODER_CONFIGS.items():  # the decoder zoo's own table (softmoe/models/gpt.py)
        register_model(_config_builder(cfg), name=name, config=cfg, task="lm")


_register_tables()
