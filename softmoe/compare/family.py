"""The family of models a comparison trains, built around one dense backbone, and how their
sizes are chosen so that their costs match (docs/design.md §1-§3).

Every model shares the backbone (width, depth, heads, patch size, MoE placement: the last
half of the blocks); only the MLPs of the MoE blocks change. Cost is forward FLOPs per image
as the zoo's profiler counts them (multiply-add = 2; router, dispatch and combine included).

  dense         the backbone ViT.
  soft          Soft MoE with P = 1 slot per expert and E experts, E chosen so that its FLOPs
                match dense within the tolerance (the closest E; error if none is close enough).
  tc1, tc2      Tokens Choice, K = 1 / 2, Batch Priority Routing, the paper's capacity factor
                1.05, the same E: the paper's baselines at their own cost (reported).
  ec            Experts Choice, capacity factor 1.0, the same E (FLOPs ~ dense).
  soft_uniform_combine, soft_uniform_dispatch, soft_uniform
                Table 2 ablations at the same E: soft dispatch + uniform combine, uniform
                dispatch + soft combine, both uniform.
  soft_identity token i -> expert i (both weights identity): defined for S = N, so E = N
                tokens (an MLP per position; no router, FLOPs = dense).
  soft_1expert  control: one expert with E slots (the same slot count and FLOPs as soft, the
                parameters of dense).
  dense_wide    control: the dense model with every MLP widened until it has the Soft MoE's
                parameter count (its FLOPs grow with it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODELS = ("dense", "soft", "tc1", "tc2", "ec", "soft_uniform_combine", "soft_uniform_dispatch", "soft_uniform",
          "soft_identity", "soft_1expert", "dense_wide")
DEFAULT_MODELS = ("dense", "soft", "tc1", "tc2", "ec")
DESCRIPTIONS = {
    "dense": "dense ViT (the backbone)",
    "soft": "Soft MoE, P=1, E matched to dense FLOPs",
    "tc1": "Tokens Choice K=1, BPR, capacity factor 1.05",
    "tc2": "Tokens Choice K=2, BPR, capacity factor 1.05",
    "ec": "Experts Choice, capacity factor 1.0",
    "soft_uniform_combine": "ablation: soft dispatch, uniform combine",
    "soft_uniform_dispatch": "ablation: uniform dispatch, soft combine",
    "soft_uniform": "ablation: uniform dispatch and combine",
    "soft_identity": "ablation: identity dispatch and combine (E = tokens)",
    "soft_1expert": "control: Soft MoE with one expert, same slot count",
    "dense_wide": "control: dense, MLPs widened to Soft MoE's parameter count",
}
BASE_ALIASES = {"micro": "vit_micro"}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison: a registry name plus `create_model` overrides."""
    key: str
    model: str  # registry name
    overrides: dict = field(default_factory=dict)  # create_model(model, **overrides)
    description: str = ""
    params: int = 0
    flops: float = 0.0  # forward FLOPs per image

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_arm(key: str) -> tuple[str, dict]:
    """An arm `MODEL[:KEY=VALUE[:KEY=VALUE...]]` -> (MODEL, {KEY: value}), e.g.
    `soft:normalize=false` -> ("soft", {"normalize": False}). Values are JSON (true, 0.5, "x"),
    else strings. The options are MoEConfig fields of a MoE model, ViTConfig fields of dense
    (checked when the family is built)."""
    import json

    base, *items = [p.strip() for p in str(key).split(":")]
    options = {}
    for item in items:
        k, sep, text = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--models: an arm's option must be KEY=VALUE (e.g. soft:normalize=false), got {key!r}")
        try:
            options[k.strip()] = json.loads(text.strip())
        except json.JSONDecodeError:
            options[k.strip()] = text.strip()
    return base, options


def arm_dirname(key: str) -> str:
    """A work-directory name for an arm key (":" -> "+": `soft+normalize=false`)."""
    return key.replace(":", "+")


def parse_models(text: str | None) -> tuple[str, ...]:
    """`"dense,soft,tc1"` -> the keys, validated; None/"" -> DEFAULT_MODELS; "all" -> MODELS.
    An arm may carry layer options: `soft:normalize=false` (split_arm). "dense" is always
    included (every verdict is against it)."""
    if text is None or not str(text).strip():
        keys = list(DEFAULT_MODELS)
    elif str(text).strip() == "all":
        keys = list(MODELS)
    else:
        keys = [k.strip() for k in str(text).split(",") if k.strip()]
        unknown = [k for k in keys if split_arm(k)[0] not in MODELS]
        if unknown:
            raise ValueError(f"--models: unknown model name(s) {unknown}; choose from {list(MODELS)} or 'all' "
                             f"(an arm may add layer options: soft:normalize=false)")
        if len(set(keys)) != len(keys):
            raise ValueError(f"--models lists a model twice: {keys}")
    if "dense" not in keys:
        keys.insert(0, "dense")
    return tuple(keys)


def resolve_base(base: str) -> str:
    """A dense registry name for `base` ("micro" or a `vit_*` name such as "vit_s16")."""
    from softmoe.models import get_config, list_models

    name = BASE_ALIASES.get(base, base)
    if not isinstance(name, str) or name not in list_models("vit_*"):
        raise ValueError(f"--base must be 'micro' or a dense model name (vit_*), got {base!r}; "
                         f"see `softmoe models 'vit_*'`")
    get_config(name)
    return name


def _profile(model: str, overrides: dict) -> tuple[int, float]:
    from softmoe.models.profile import profile_model

    p = profile_model(model, **overrides)
    return p.params, float(p.flops)


def _moe(family: str, base: str) -> str:
    return base.replace("vit_", f"{family}_", 1)


def match_experts(base: str, backbone: dict, tolerance: float, multiple_of: int = 4,
                  max_experts: int | None = None) -> tuple[int, float]:
    """(E, FLOPs(soft) / FLOPs(dense) - 1) for the Soft MoE (P = 1, E a multiple of
    `multiple_of`, so that experts shard evenly) whose FLOPs are closest to the dense
    backbone's; ValueError when the closest is further than `tolerance`."""
    _, f0 = _profile(base, backbone)
    from softmoe.models import get_config

    cfg = get_config(base, **backbone)
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    limit = max_experts or 4 * tokens
    best = None
    for e in range(multiple_of, limit + 1, multiple_of):  # FLOPs grow with E: stop once past the target
        _, f = _profile(_moe("soft_moe", base), {**backbone, "moe": {"num_experts": e}})
        rel = f / f0 - 1
        if best is None or abs(rel) < abs(best[1]):
            best = (e, rel)
        if rel > 0:
            break
    if abs(best[1]) > tolerance:
        raise ValueError(f"no Soft MoE expert count (a multiple of {multiple_of}) matches the dense FLOPs within "
                         f"--flops-tolerance={tolerance:g} (closest: E={best[0]}, {100 * best[1]:+.1f}%); loosen the "
                         f"tolerance or give --experts")
    return best


def build_family(base: str, keys, backbone: dict | None = None, experts: int | None = None,
                 tolerance: float = 0.05, group_size: int = 1) -> tuple[list[ModelSpec], dict]:
    """The ModelSpecs for `keys` and a dict describing the matching (for the report).

    backbone: ViTConfig overrides shared by every model (patch_size, img_size, num_classes,
    in_chans, ...). experts: E for the MoE models (default: matched to dense FLOPs).
    group_size: images per routing group of Tokens/Experts Choice (the paper routes groups of
    several images; with one small image the capacity's rounding up to a multiple of 4
    wastes most of Tokens Choice's buffer). It must divide every batch size."""
    base = resolve_base(base)
    backbone = dict(backbone or {})
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ValueError(f"--flops-tolerance must be a fraction in (0, 1), got {tolerance!r}")
    if experts is None:
        e, rel = match_experts(base, backbone, tolerance)
        how = f"E={e} matches dense FLOPs ({100 * rel:+.2f}%, tolerance ±{100 * tolerance:g}%)"
    else:
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
            raise ValueError(f"--experts must be an integer >= 1, got {experts!r}")
        e = experts
        how = f"E={e} given with --experts"
    from softmoe.models import get_config

    cfg = get_config(base, **backbone)
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    soft_name, tc_name, ec_name = _moe("soft_moe", base), _moe("tc_moe", base), _moe("ec_moe", base)
    def moe(**options) -> dict:  # overrides of a MoE model: the backbone plus its MoE section
        return {**backbone, "moe": {"num_experts": e, **options}}

    group = {"group_size": group_size}
    recipes: dict[str, tuple[str, dict]] = {
        "dense": (base, dict(backbone)),
        "soft": (soft_name, moe()),
        "tc1": (tc_name, moe(k=1, capacity_factor=1.05, batch_priority=True, **group)),
        "tc2": (tc_name, moe(k=2, capacity_factor=1.05, batch_priority=True, **group)),
        "ec": (ec_name, moe(capacity_factor=1.0, **group)),
        "soft_uniform_combine": (soft_name, moe(dispatch="soft", combine="uniform")),
        "soft_uniform_dispatch": (soft_name, moe(dispatch="uniform", combine="soft")),
        "soft_uniform": (soft_name, moe(dispatch="uniform", combine="uniform")),
        "soft_identity": (soft_name, {**backbone, "moe": {"num_experts": tokens, "dispatch": "identity",
                                                          "combine": "identity"}}),
        "soft_1expert": (soft_name, {**backbone, "moe": {"num_experts": 1, "slots_per_expert": e}}),
    }
    specs = []
    for key in keys:
        name, options = split_arm(key)
        if name == "dense_wide":
            model, over = base, _widened(base, backbone, _profile(*recipes["soft"])[0])
        else:
            model, over = recipes[name]
        description = DESCRIPTIONS[name]
        if options:
            if over.get("moe") is not None:
                over = {**over, "moe": {**over["moe"], **options}}
            else:
                over = {**over, **options}
            description += "; " + ", ".join(f"{k}={v}" for k, v in options.items())
        try:
            params, flops = _profile(model, over)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--models: arm {key!r}: {e}") from None
        specs.append(ModelSpec(key, model, over, description, params, flops))
    dense_flops = _profile(base, backbone)[1]
    info = {"base": base, "experts": e, "tokens": tokens, "slots": e, "matching": how,
            "tolerance": tolerance, "dense_flops": dense_flops, "group_size": group_size}
    return specs, info


def _widened(base: str, backbone: dict, target_params: int) -> dict:
    """Overrides of the dense model with every block's MLP widened (the ViT has one mlp_dim)
    to the hidden width whose parameter count is closest to `target_params` (parameters are
    linear in the width)."""
    p0, _ = _profile(base, backbone)
    from softmoe.models import get_config

    cfg = get_config(base, **backbone)
    h0 = cfg.mlp_dim
    p1, _ = _profile(base, {**backbone, "mlp_dim": h0 + 1})
    per_unit = p1 - p0  # parameters per hidden unit (all blocks)
    h = max(h0, round(h0 + (target_params - p0) / per_unit))
    return {**backbone, "mlp_dim": int(h)}
