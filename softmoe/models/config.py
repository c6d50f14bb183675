"""Model configuration: `ViTConfig` (docs/design.md §3) with its typed `MoEConfig` section
(§1 Soft MoE, §2 sparse baselines), and the one parser of `--set key=value` model overrides
(`softmoe train --set model.KEY=VALUE`, `softmoe info --set KEY=VALUE`).

    ViTConfig(depth=12, ..., moe=MoEConfig("soft", num_experts=128, slots_per_expert=1))
    cfg.replace(moe={"num_experts": 256})     # change one MoE field, keep the others
    cfg.replace(moe=None)                     # the dense ViT

Configs written before the MoE section was typed stored flat `moe_type`, `num_experts`,
`moe_placement` and `moe_kwargs` keys; `from_dict`, `replace` (hence `create_model(name,
**overrides)`) and the `--set` parser still accept them (`nest_legacy_keys`).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass

import torch
from torch import nn

from softmoe._fields import (check_fields, check_keys, is_instance, parse_text, split_assignment, type_name,
                             unknown_key_message)
from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

# MoE layers a config can name (canonical class name -> class) and accepted aliases.
MOE_LAYERS: dict[str, type[nn.Module]] = {
    "SoftMoE": SoftMoE, "TokensChoiceMoE": TokensChoiceMoE, "ExpertsChoiceMoE": ExpertsChoiceMoE}
MOE_ALIASES = {
    "soft": "SoftMoE", "soft_moe": "SoftMoE", "softmoe": "SoftMoE",
    "tokens_choice": "TokensChoiceMoE", "tc": "TokensChoiceMoE", "tc_moe": "TokensChoiceMoE",
    "experts_choice": "ExpertsChoiceMoE", "ec": "ExpertsChoiceMoE", "ec_moe": "ExpertsChoiceMoE"}
# Layer constructor arguments the model derives itself, so a config never sets them.
DERIVED_LAYER_ARGS = ("dim", "num_experts", "hidden_dim")
POOLS = ("gap", "token", "map")


def resolve_moe_type(moe_type: str) -> str:
    """Canonical class name for a MoE type name or alias; ValueError if unknown."""
    name = MOE_ALIASES.get(moe_type, moe_type) if isinstance(moe_type, str) else moe_type
    if name not in MOE_LAYERS:
        names = sorted(MOE_LAYERS) + sorted(MOE_ALIASES)
        raise ValueError(f"moe_type must be one of {names} or None, got {moe_type!r}")
    return name


def moe_block_indices(placement, depth: int) -> tuple[int, ...]:
    """Which blocks hold a MoE layer.

    placement: "last_half" (the paper: blocks depth//2.. for even depth, e.g. 6-11 of 12),
      "last:N" (the last N blocks), "every:K" (blocks K-1, 2K-1, ..., so the last block is
      always MoE, V-MoE's "every other layer" for K=2), "all", or an explicit list of
      block indices in [0, depth).
    """
    bad = ValueError(f"MoE placement must be 'last_half', 'last:N', 'every:K', 'all' or a list of block indices "
                     f"in [0, depth={depth}), got {placement!r}")
    if isinstance(placement, str):
        kind, _, arg = placement.partition(":")
        if placement == "last_half":
            return tuple(range(depth - depth // 2, depth))
        if placement == "all":
            return tuple(range(depth))
        if kind in ("last", "every") and arg.isdigit():
            n = int(arg)
            if kind == "last" and 1 <= n <= depth:
                return tuple(range(depth - n, depth))
            if kind == "every" and 1 <= n <= depth:
                return tuple(i for i in range(depth) if (i + 1) % n == 0)
        raise bad
    if isinstance(placement, (list, tuple)) and placement:
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in placement):
            raise bad
        if len(set(placement)) != len(placement):
            raise ValueError(f"MoE placement lists a block twice: {list(placement)}")
        return tuple(sorted(placement))
    raise bad


@dataclass
class MoEConfig:
    """The MoE layers of a ViT: which layer, how many experts, in which blocks, and the
    layer's options. An option left None takes the layer's own default (the paper's setting
    for that layer); setting an option the chosen layer does not have is a ValueError naming it.
    """
    # "SoftMoE" (§1), "TokensChoiceMoE" or "ExpertsChoiceMoE" (§2), or an alias ("soft", "tc", "ec").
    type: str
    # E experts per MoE layer (paper Table 8: 128 for most sizes).
    num_experts: int
    # The blocks that get a MoE layer: "last_half" (the paper), "last:N", "every:K", "all" or a list.
    placement: str | list[int] = "last_half"
    # -- Soft MoE (§1) ----------------------------------------------------------------------
    # P slots per expert; the paper uses 1. The cost follows the E*P slots, not E.
    slots_per_expert: int | None = None
    # Table 2 ablations: "soft" (the paper), "uniform" (means) or "identity" (token i <-> slot i).
    dispatch: str | None = None
    combine: str | None = None
    # l2-normalise tokens and phi before the logits (the official code: True; wide models need it).
    normalize: bool | None = None
    # The router logits' matmul under autocast: "float32" (default, as the official code) or "autocast"
    # (bf16/fp16 operands, float32 softmaxes; routing weights off by up to ~8e-3, docs/benchmarks.md).
    logits_dtype: str | None = None
    # -- Tokens Choice / Experts Choice (§2) --------------------------------------------------
    # Experts each token picks (Tokens Choice); V-MoE's K = 1 or 2.
    k: int | None = None
    # Expert buffer size over a balanced load: C = k*T*factor/E (TC: 1.05 train, 1.5 fine-tune), T*factor/E (EC).
    capacity_factor: float | None = None
    # C itself, instead of capacity_factor (to pin the compute of a comparison).
    capacity: int | None = None
    # Tokens Choice: round C up to a multiple of this (vmoe: 4, for TPU tiling); 1 disables (the layer's None).
    capacity_multiple_of: int | None = None
    # Tokens Choice: "ceil" or "round" in the capacity formula.
    capacity_rounding: str | None = None
    # Tokens Choice: Batch Priority Routing, tokens with larger gates claim capacity first (V-MoE).
    batch_priority: bool | None = None
    # Sequences routed together; capacity is shared within a group, so larger groups drop fewer tokens.
    group_size: int | None = None
    # Tokens Choice: weights of the load-balancing auxiliary losses (V-MoE: 0.005, 0.005, 0).
    importance_loss_weight: float | None = None
    load_loss_weight: float | None = None
    gshard_loss_weight: float | None = None
    # -- every layer ------------------------------------------------------------------------
    # Training noise on the routing logits: Soft MoE 0 (no paper run uses it), sparse gates 1.0 (V-MoE).
    noise_std: float | None = None
    # "identical" (vmoe: every expert starts as the same MLP) or "distinct".
    expert_init: str | None = None
    # A ValueError on non-finite input instead of NaN outputs (costs a device sync; off by default).
    check_finite: bool | None = None
    # "fused" (default: hand-written backward, buffer reuse, CPU kernels) or "reference" (plain
    # autograd, e.g. for double backward); the same function either way (docs/design.md §7.2).
    impl: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "MoEConfig")
        self.type = resolve_moe_type(self.type)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1 for moe type {self.type!r}, got {self.num_experts}")
        if isinstance(self.placement, tuple):
            self.placement = list(self.placement)  # lists round-trip through JSON
        accepted = layer_options(self.type)
        foreign = sorted(set(self.layer_kwargs()) - set(accepted))
        if foreign:
            raise ValueError(f"MoE option(s) {foreign} do not apply to {self.type}; its options are {accepted}")

    def __repr__(self) -> str:  # only the options that are set
        return f"MoEConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def layer_kwargs(self) -> dict:
        """The options that are set (not None), as constructor arguments of the layer."""
        return {name: getattr(self, name) for name in OPTION_FIELDS if getattr(self, name) is not None}

    def build(self, dim: int, hidden_dim: int) -> nn.Module:
        """One MoE layer of width `dim` whose experts have hidden width `hidden_dim`."""
        return MOE_LAYERS[self.type](dim=dim, num_experts=self.num_experts, hidden_dim=hidden_dim,
                                     **self.layer_kwargs())

    def to_dict(self) -> dict:
        """type, num_experts, placement and the options that are set (None means the default)."""
        return {"type": self.type, "num_experts": self.num_experts, "placement": self.placement,
                **self.layer_kwargs()}

    @classmethod
    def from_layer_kwargs(cls, moe_type: str, num_experts: int, placement="last_half", **kwargs) -> MoEConfig:
        """The config of a layer given by its constructor arguments (as `upcycle` takes them)."""
        options = options_from_layer_kwargs(kwargs)
        return cls.from_dict({"type": moe_type, "num_experts": num_experts, "placement": placement, **options})

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        if not isinstance(d, dict):
            raise ValueError(f"moe must be a dict of MoEConfig fields or None, got {d!r}")
        check_keys(d, cls, "MoEConfig field")
        if "type" not in d:
            given = ", ".join(f"{k}={v!r}" for k, v in d.items())
            raise ValueError(f"{given} need a MoE layer type (moe.type, or moe_type: one of {sorted(MOE_LAYERS)}); "
                             f"a dense ViT has no experts")
        if "num_experts" not in d:
            raise ValueError(f"moe type {d['type']!r} needs num_experts (moe.num_experts >= 1)")
        return cls(**d)


OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(MoEConfig))[3:]  # after type, num_experts, placement


def options_from_layer_kwargs(kwargs: dict) -> dict:
    """MoE layer constructor arguments as MoEConfig options. The one difference: a layer's
    `capacity_multiple_of=None` turns the rounding off, while None in a MoEConfig means the
    default (4), so it becomes 1 (also off)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"moe_kwargs must be a dict, got {kwargs!r}")
    if "capacity_multiple_of" in kwargs and kwargs["capacity_multiple_of"] is None:
        return {**kwargs, "capacity_multiple_of": 1}
    return dict(kwargs)


def layer_options(moe_type: str) -> list[str]:
    """The MoEConfig options that layer `moe_type` accepts (its constructor's arguments)."""
    params = inspect.signature(MOE_LAYERS[resolve_moe_type(moe_type)].__init__).parameters
    return [p for p in params if p not in ("self", *DERIVED_LAYER_ARGS)]


@dataclass
class ViTConfig:
    """Everything needed to build a `VisionTransformer`; `to_dict()` is JSON-serialisable.

    Defaults are ViT-B/16 at 224 px, dense (`moe=None`). A MoE model has a `MoEConfig`,
    e.g. `moe=MoEConfig("soft", num_experts=128)` or `MoEConfig("tc", 32, k=2, capacity_factor=1.05)`.
    """
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, forward returns the pooled features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    qk_norm: bool = True
    pool: str = "gap"  # "gap" (paper), "token" (class token) or "map" (attention pooling)
    layer_norm_eps: float = 1e-6
    moe: MoEConfig | None = None  # None: a dense ViT
    name: str = "vit"  # informational: the registry name the config came from

    def __post_init__(self) -> None:
        check_fields(self, "ViTConfig")
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            _check_int(key, getattr(self, key), 1)
        _check_int("num_classes", self.num_classes, 0)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"layer_norm_eps must be a finite number > 0, got {eps!r}")
        if self.moe is None:
            return
        moe_block_indices(self.moe.placement, self.depth)
        with torch.device("meta"):  # the layer checks its option values now, not at the first forward
            layer = self.moe.build(self.embed_dim, self.mlp_dim)
        if hasattr(layer, "capacity_for"):  # sparse routing: each expert must take >= 1 token
            layer.capacity_for(layer.group_size * self.num_tokens)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image inside the blocks (patches, plus the class token if any)."""
        return self.num_patches + (self.pool == "token")

    @property
    def moe_type(self) -> str | None:
        """The MoE layer's class name, None for a dense ViT."""
        return None if self.moe is None else self.moe.type

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer, 0 for a dense ViT."""
        return 0 if self.moe is None else self.moe.num_experts

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        return () if self.moe is None else moe_block_indices(self.moe.placement, self.depth)

    def replace(self, **changes) -> ViTConfig:
        """A validated copy with `changes` applied: ViTConfig fields, where `moe` takes a
        MoEConfig, None (dense) or a dict of MoEConfig fields to change on the current one;
        the legacy keys of `nest_legacy_keys` work too. Unknown keys -> ValueError."""
        return dataclasses.replace(self, **_typed_changes(changes, self.moe))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        """The config of `to_dict()` output, or of a legacy dict (flat moe_type / num_experts /
        moe_placement / moe_kwargs keys, as configs were saved before the MoE section)."""
        if not isinstance(d, dict):
            raise ValueError(f"a ViTConfig must be a dict, got {type(d).__name__}")
        return cls(**_typed_changes(d, None))


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# -- overrides: legacy keys, the `moe` section, `--set` text --------------------------------
LEGACY_MOE_KEYS = {"moe_type": "type", "num_experts": "num_experts", "moe_placement": "placement"}
DENSE_KEYS = {"num_experts", "placement"}  # what a legacy dense config may say about experts (0, any)


def nest_legacy_keys(d: dict) -> dict:
    """Flat pre-MoEConfig keys -> the `moe` section: moe_type -> moe.type, num_experts ->
    moe.num_experts, moe_placement -> moe.placement, moe_kwargs={...} -> those MoEConfig
    options. `moe_type=None` means dense: then num_experts must be 0 (or absent) and
    moe_kwargs empty; moe_placement is ignored. Other keys are returned unchanged."""
    legacy = {k: d[k] for k in (*LEGACY_MOE_KEYS, "moe_kwargs") if k in d}
    if not legacy:
        return dict(d)
    out = {k: v for k, v in d.items() if k not in legacy}
    if "moe" in out and not isinstance(out["moe"], dict):
        raise ValueError(f"give moe or the legacy keys {sorted(legacy)}, not both")
    kwargs = options_from_layer_kwargs(legacy.pop("moe_kwargs", None) or {})
    if "moe_type" in legacy and legacy["moe_type"] is None:
        if legacy.get("num_experts") or kwargs:
            raise ValueError(f"num_experts={legacy.get('num_experts', 0)} / moe_kwargs={kwargs} need a MoE layer type "
                             f"(moe_type: one of {sorted(MOE_LAYERS)}); a dense ViT has num_experts=0")
        return {**out, "moe": None}
    moe = {LEGACY_MOE_KEYS[k]: v for k, v in legacy.items()}
    return {**out, "moe": {**out.get("moe", {}), **moe, **kwargs}}


def _typed_changes(changes: dict, current: MoEConfig | None) -> dict:
    """`changes` with legacy keys nested and a `moe` dict applied to `current` (a MoEConfig)."""
    changes = nest_legacy_keys(changes)
    _check_vit_keys(changes)
    moe = changes.get("moe")
    if current is None and isinstance(moe, dict) and moe.get("num_experts") == 0 and set(moe) <= DENSE_KEYS:
        changes["moe"] = None  # num_experts=0 on a dense config: the legacy way of saying dense
    elif isinstance(moe, dict):
        base = {} if current is None else current.to_dict()
        check_keys(moe, MoEConfig, "MoEConfig field")
        merged = {k: v for k, v in {**base, **moe}.items() if v is not None}  # None: the default
        changes["moe"] = MoEConfig.from_dict(merged)
    return changes


def check_overrides(overrides: dict) -> dict:
    """Model overrides (for `create_model` / `ViTConfig.replace`) checked without building
    anything: legacy keys nested into `moe`, every key a ViTConfig / MoEConfig field, every
    value of the field's type (or None: the default). Returns the normalised, JSON-ready dict
    (a MoEConfig value becomes its dict)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"model overrides must be a dict of ViTConfig fields, got {overrides!r}")
    out = nest_legacy_keys(overrides)
    _check_vit_keys(out)
    if isinstance(out.get("moe"), MoEConfig):
        out["moe"] = out["moe"].to_dict()
    sections = [("", ViTConfig, {k: v for k, v in out.items() if k != "moe"})]
    if out.get("moe") is not None:
        if not isinstance(out["moe"], dict):
            raise ValueError(f"model override 'moe' must be a dict of MoEConfig fields or None, got {out['moe']!r}")
        check_keys(out["moe"], MoEConfig, "MoEConfig field")
        sections.append(("moe.", MoEConfig, out["moe"]))
    for prefix, cls, values in sections:
        hints = _hints(cls)
        for key, value in values.items():
            if value is not None and not is_instance(value, hints[key]):
                raise ValueError(f"model override {prefix}{key} must be {type_name(hints[key])}, got {value!r}")
    return out


def _check_vit_keys(d: dict, shown: str | None = None) -> None:
    """ValueError for a key of `d` that is no ViTConfig field, suggesting close names among
    the fields, the legacy keys and the moe.* fields (`shown`: the key as the user wrote it)."""
    fields = [f.name for f in dataclasses.fields(ViTConfig)]
    for key in d:
        if key not in fields:
            known = [*fields, *LEGACY_MOE_KEYS, "moe_kwargs", *(f"moe.{f.name}" for f in dataclasses.fields(MoEConfig))]
            raise ValueError(unknown_key_message(shown or key, known, "ViTConfig field"))


def merge_overrides(a: dict, b: dict) -> dict:
    """`a` updated by `b`, merging their `moe` dicts (b wins on a shared key)."""
    out = {**a, **b}
    if isinstance(a.get("moe"), dict) and isinstance(b.get("moe"), dict):
        out["moe"] = {**a["moe"], **b["moe"]}
    return out


def parse_override(key: str, text: str, prefix: str = "") -> dict:
    """One `--set KEY=TEXT` model override -> an overrides dict for `ViTConfig.replace` and
    `create_model`, TEXT parsed by the field's type:

        patch_size=2           {"patch_size": 2}
        moe.num_experts=16     {"moe": {"num_experts": 16}}
        moe.placement=[8,9]    {"moe": {"placement": [8, 9]}}
        moe={"k": 2}           {"moe": {"k": 2}}   (several MoE fields)
        moe=none               {"moe": None}       (dense; also moe.type=none, moe_type=none)

    Legacy names: moe_type, num_experts, moe_placement -> moe.type, moe.num_experts,
    moe.placement; moe_kwargs={json} and moe_kwargs.OPTION -> moe.OPTION. Messages show
    the key as `prefix + key` (softmoe train: "model.").
    """
    parts = key.split(".")
    key = prefix + key
    if parts[0] in LEGACY_MOE_KEYS:
        parts = ["moe", LEGACY_MOE_KEYS[parts[0]], *parts[1:]]
    elif parts[0] == "moe_kwargs":
        parts = ["moe", *parts[1:]]
    _check_vit_keys({parts[0]: None}, shown=key)
    if parts[0] != "moe":
        if len(parts) > 1:
            raise ValueError(f"--set {key}: {parts[0]!r} takes no '.subkey'")
        return {parts[0]: parse_text(key, text, _hints(ViTConfig)[parts[0]])}
    none = text.strip().lower() in ("none", "null")
    if len(parts) == 1:
        if none:
            return {"moe": None}
        return {"moe": parse_text(key, text, dict)}
    if len(parts) > 2:
        raise ValueError(f"--set {key}: MoEConfig fields take no '.subkey'")
    hints = _hints(MoEConfig)
    if parts[1] not in hints:
        raise ValueError(unknown_key_message(parts[1], hints, "MoEConfig field"))
    if parts[1] == "type" and none:
        return {"moe": None}
    return {"moe": {parts[1]: parse_text(key, text, hints[parts[1]])}}


def parse_overrides(items: list[str]) -> dict:
    """`["KEY=VALUE", ...]` (see `parse_override`) -> one overrides dict, later items winning."""
    out: dict = {}
    for item in items:
        out = merge_overrides(out, parse_override(*split_assignment(item)))
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)
