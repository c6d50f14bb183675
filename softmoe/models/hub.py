"""Checkpoints: `save_pretrained(model, dir)` / `from_pretrained(dir, **overrides)`.

A checkpoint directory holds two files, each written atomically (temp file in the same
directory, fsync, `os.replace`), the weights first so that a `config.json` never points at
missing weights:

    config.json        {"format": "softmoe", "format_version": 2, "architecture": "vit",
                        "config": ViTConfig.to_dict()}
    model.safetensors  the state dict, every tensor in its own dtype (bit-exact round trip)

Loading never unpickles anything (json + safetensors) and checks every tensor's dtype: floating
point, and one dtype per module, that of its largest tensor (the position embedding follows the
patch embedding). A float16 bias beside a float32 weight is cast up, losslessly; an integer
tensor, or float64 where float32 is expected, is a ValueError naming it (`check_dtypes`).

Overrides may change the image size: the position embedding is then resampled bicubically
over its 2-D grid (as timm and big_vision do); the number of Soft MoE slots does not depend on
the image size and stays fixed (docs/design.md §1). An override of `num_classes` keeps every
weight except the head, which is freshly initialised. Any other shape difference is a
ValueError naming the tensor.

Format version 1 (before the typed MoE section) stored flat moe_type / num_experts /
moe_placement / moe_kwargs keys; it loads unchanged (`ViTConfig.from_dict` migrates it).

`load_model(path)` also finds the model of a training work directory (the newest of its
WORKDIR/checkpoints/step_* directories, each a save_pretrained directory plus the training
state), so evaluation never needs softmoe.train.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from softmoe._io import atomic_write, atomic_write_text

from .config import ViTConfig
from .pretrained import resolve as resolve_name
from .registry import apply_overrides
from .vit import VisionTransformer, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "softmoe"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: flat MoE keys, migrated on load
ARCHITECTURE = "vit"
POS_EMBED = "pos_embed"
HEAD_KEYS = ("head.weight", "head.bias")


# -- writing --------------------------------------------------------------------------------
def save_pretrained(model: VisionTransformer, directory) -> Path:
    """Write `model`'s config and weights to `directory` (created if needed); returns it.

    Tensors keep their dtype (float32, bfloat16, ...) and are moved to the CPU for writing.
    """
    from safetensors.torch import save_file

    from .gpt import GPT

    if isinstance(model, GPT):  # a decoder of the zoo: its own format (architecture "gpt", docs/design.md §8)
        from .gpt import save_pretrained as save_decoder

        return save_decoder(model, directory)
    if not isinstance(model, VisionTransformer) or not isinstance(getattr(model, "config", None), ViTConfig):
        raise ValueError(f"model must be a softmoe VisionTransformer (with a ViTConfig in .config), "
                         f"got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} is a file; save_pretrained writes a folder")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        if value.is_meta:
            raise ValueError(f"cannot save {key!r}: it is a meta tensor (the model was built without memory)")
        # clone() so that no two entries share storage (safetensors refuses shared tensors).
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    text = _config_text(model.config)
    metadata = {"format": "pt", "softmoe_format_version": str(FORMAT_VERSION)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(directory / CONFIG_NAME, text)
    return directory


def _config_text(config: ViTConfig) -> str:
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
                "config": config.to_dict()}
    try:
        return json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.config is not JSON-serialisable ({e}); config: {config}") from e


def save_config(config: ViTConfig, directory) -> Path:
    """Write only `config.json` (what `save_pretrained` writes besides the weights) into the
    existing `directory`: the model description of a DCP checkpoint (`DCP_DIR` holds the
    weights). Returns the file's path."""
    return atomic_write_text(Path(directory) / CONFIG_NAME, _config_text(config))


# -- reading --------------------------------------------------------------------------------
def load_config(directory) -> ViTConfig:
    """The validated `ViTConfig` of a checkpoint directory written by `save_pretrained`."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist (or is not a directory)")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: {str(directory)!r} is not a softmoe checkpoint directory "
                                f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by save_pretrained)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        got = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{str(path)!r} is not a softmoe config: expected \"format\": {FORMAT!r}, got {got!r} "
                         f"(a foreign config.json, e.g. from transformers or timm?)")
    version = document.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} has format_version {version!r}; this softmoe reads versions "
                         f"{list(READABLE_VERSIONS)}")
    if document.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{str(path)!r} has architecture {document.get('architecture')!r}, "
                         f"expected {ARCHITECTURE!r}")
    if not isinstance(document.get("config"), dict):
        raise ValueError(f"{str(path)!r} has no \"config\" object")
    try:
        return ViTConfig.from_dict(document["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(path)!r}: invalid \"config\": {e}") from e


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU); a missing, truncated or corrupt file is a
    FileNotFoundError / ValueError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e


# -- dtypes -----------------------------------------------------------------------------------
def is_lossless_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """True if every `src` value is exactly a `dst` value: the same dtype, or a floating dtype
    into one with at least its mantissa and exponent range (float16 / bfloat16 -> float32 ->
    float64). float64 -> float32 or float16 <-> bfloat16 are not."""
    if src == dst:
        return True
    if not (src.is_floating_point and dst.is_floating_point):
        return False
    s, d = torch.finfo(src), torch.finfo(dst)
    return s.eps >= d.eps and s.max <= d.max and s.smallest_normal >= d.smallest_normal


def _module_dtypes(state: dict) -> dict[str, torch.dtype]:
    """key -> the dtype its tensor should have: that of the largest floating tensor of its
    module (a module computes in one dtype); the root's tensors (pos_embed, cls_token) are
    added to the patch embedding's output, so they follow patch_embed.proj.weight."""
    largest: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        if module not in largest or value.numel() > largest[module].numel():
            largest[module] = value
    stream = state.get("patch_embed.proj.weight")
    if isinstance(stream, torch.Tensor) and stream.is_floating_point():
        largest[""] = stream
    return {key: largest[key.rpartition(".")[0]].dtype for key in state if key.rpartition(".")[0] in largest}


def check_dtypes(state: dict, source: str, expected: dict[str, torch.dtype] | None = None) -> dict:
    """`state` with every tensor's dtype checked: floating point, and equal to `expected[key]`
    (default: its module's dtype, see `_module_dtypes`) or cast to it where that is lossless
    (e.g. a float16 bias next to a float32 weight). Anything else (an integer or bool
    tensor, float64 where float32 is expected) is a ValueError naming `source` and the tensors."""
    want = _module_dtypes(state) if expected is None else expected
    out, wrong = {}, []
    for key, value in state.items():
        target = want.get(key)
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif not value.is_floating_point():
            wrong.append(f"tensor {key!r} has dtype {value.dtype}, expected {target or 'a floating-point dtype'}")
        elif target is None or value.dtype == target:
            out[key] = value
        elif is_lossless_cast(value.dtype, target):
            out[key] = value.to(target)
        else:
            wrong.append(f"tensor {key!r} has dtype {value.dtype}, expected {target} (a cast would lose precision)")
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong dtype: {'; '.join(wrong[:8])}"
                         f"{' ...' if len(wrong) > 8 else ''}")
    return out


# -- position embedding ---------------------------------------------------------------------
def resample_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None) -> torch.Tensor:
    """Resample a patch position embedding (1, h*w, D) to a new grid (1, h'*w', D).

    Bicubic, align_corners=False, antialias=True (PyTorch's antialiased path uses the Keys
    kernel with a = -0.5, which reproduces linear ramps exactly, and widens the kernel when
    shrinking), computed in float32 at least and cast back to the input dtype: the same as
    timm's `resample_abs_pos_embed`. Grids are (rows, cols) or an int for square grids; `old_grid`
    defaults to the square root of the token count. The same grid returns the input as is.
    """
    def as_grid(g, name):
        g = (g, g) if isinstance(g, int) and not isinstance(g, bool) else tuple(g)
        if len(g) != 2 or not all(isinstance(v, int) and v >= 1 for v in g):
            raise ValueError(f"{name} must be a positive int or (rows, cols), got {g!r}")
        return g

    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    _, n, dim = pos_embed.shape
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} tokens, not a square grid; give old_grid=(rows, cols)")
        old_grid = side
    old_grid, new_grid = as_grid(old_grid, "old_grid"), as_grid(new_grid, "new_grid")
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid={old_grid} does not match the {n} tokens of pos_embed")
    if old_grid == new_grid:
        return pos_embed
    compute = torch.promote_types(pos_embed.dtype, torch.float32)
    grid = pos_embed.to(compute).reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


# -- loading weights into a model -------------------------------------------------------------
def adapt_state_dict(model: VisionTransformer, state_dict: dict, source: str = "state_dict",
                     skip_head: bool = False) -> dict[str, torch.Tensor]:
    """`state_dict` checked against `model` and made to fit it.

    The position embedding is resampled when the patch grid differs (the width must match);
    with `skip_head` the head tensors are left out (the caller keeps the model's own head).
    Missing or unexpected keys, any other shape difference and an integer or bool tensor where
    the model has a floating one are a ValueError naming `source`, the key, and what is expected.
    """
    expected = model.state_dict()
    keys = set(state_dict)
    if skip_head:
        keys -= set(HEAD_KEYS)
    wanted = set(expected) - (set(HEAD_KEYS) if skip_head else set())
    missing, unexpected = sorted(wanted - keys), sorted(keys - wanted)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"{source} does not match the model ({model.config.name}): {'; '.join(parts)}")
    out, wrong = {}, []
    for key in sorted(keys):
        value, want = state_dict[key], expected[key]
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key!r} is a {type(value).__name__}, not a tensor")
            continue
        if want.is_floating_point() and not value.is_floating_point():
            wrong.append(f"tensor {key!r} has dtype {value.dtype}, expected a floating-point dtype ({want.dtype})")
            continue
        if key == POS_EMBED and value.shape != want.shape and value.dim() == 3 and value.shape[-1] == want.shape[-1]:
            value = resample_pos_embed(value, model.patch_embed.grid)
        if value.shape != want.shape:
            wrong.append(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
        out[key] = value
    if wrong:
        raise ValueError(f"{source} does not fit the model ({model.config.name}): {'; '.join(wrong[:8])}"
                         f"{' ...' if len(wrong) > 8 else ''}")
    return out


def load_weights(model: VisionTransformer, state_dict: dict, source: str = "state_dict",
                 assign: bool = False) -> VisionTransformer:
    """Load `state_dict` into `model`, resampling the position embedding if the model was
    built for another image size. `assign=False` copies into the model's tensors (keeping
    their dtype and device); `assign=True` adopts the given tensors (their dtype too)."""
    adapted = adapt_state_dict(model, state_dict, source)
    model.load_state_dict(adapted, strict=True, assign=assign)
    return model


def from_pretrained(directory, *, device=None, dtype: torch.dtype | None = None, **overrides) -> VisionTransformer:
    """The model saved in `directory` by `save_pretrained`, or the shipped model of that name
    (`list_pretrained()`; a path that exists always wins).

    overrides: any ViTConfig field. `img_size` (or another size that changes the patch
      grid) resamples the position embedding; `num_classes` gives a fresh head; anything
      that changes another tensor's shape is a ValueError.
    device, dtype: where to put the model afterwards (dtype: a floating torch.dtype); by
      default it stays on the CPU with the dtypes stored in the file (bit-exact), which must
      be floating point and agree within each module (see `check_dtypes`).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    directory = resolve_name(directory)  # a shipped model's name (softmoe/models/pretrained.py)
    if saved_architecture(directory) == "gpt":  # a decoder (softmoe/models/gpt.py)
        from .gpt import from_pretrained as load_decoder

        if overrides:
            raise ValueError(f"from_pretrained of a GPT checkpoint takes no config overrides, got {sorted(overrides)}")
        model = load_decoder(directory)
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', "
                             f"got {device!r}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available")
    saved = load_config(directory)
    directory = Path(directory)
    cfg = apply_overrides(saved, overrides) if overrides else saved
    state = check_dtypes(load_safetensors(directory / WEIGHTS_NAME), str(directory / WEIGHTS_NAME))
    new_head = cfg.num_classes != saved.num_classes
    # Built on the meta device: no time or memory spent on an initialisation that the
    # loaded tensors replace (`assign=True` adopts them, with their dtype).
    with torch.device("meta"):
        model = build_model(cfg)
    adapted = adapt_state_dict(model, state, source=str(directory / WEIGHTS_NAME), skip_head=new_head)
    model.load_state_dict(adapted, strict=not new_head, assign=True)
    if new_head:
        model.reset_classifier(cfg.num_classes)  # a fresh head on the loaded tensors' device
        head_dtype = model.norm.weight.dtype
        model.head.to(head_dtype)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"from_pretrained left tensors uninitialised: {leftover} (a bug: please report)")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def saved_architecture(directory) -> str | None:
    """The "architecture" entry of `directory`'s softmoe config.json ("vit", "gpt"), or None
    when there is no readable one (load_config then says what is wrong)."""
    if not isinstance(directory, (str, os.PathLike)):
        return None
    try:
        doc = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc.get("architecture") if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def is_dcp_dir(directory) -> bool:
    """True if `directory` is a checkpoint of a parallel run: a softmoe config.json and a DCP
    checkpoint folder `DCP_DIR` (not validated)."""
    directory = Path(directory)
    return (directory / CONFIG_NAME).is_file() and (directory / DCP_DIR).is_dir()


def from_dcp(directory) -> VisionTransformer:
    """The model of a DCP checkpoint directory (config.json + `DCP_DIR`), read in this process
    without any process group: built on meta from the config, allocated on the CPU, every
    tensor loaded from the shards (whatever layout wrote them). Train mode, as from_pretrained."""
    from softmoe.distributed.checkpoint import load_checkpoint

    cfg = load_config(directory)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    load_checkpoint(Path(directory) / DCP_DIR, model)
    return model.train()


def is_pretrained_dir(directory) -> bool:
    """True if `directory` has a softmoe config.json and a weights file (not validated)."""
    directory = Path(directory)
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


# -- training work directories ------------------------------------------------------------------
# WORKDIR/config.json is the run's training config; WORKDIR/checkpoints/step_00001234/ holds a
# save_pretrained directory plus train_config.json and train_state.pt (see softmoe.train.checkpoint).
CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
DCP_DIR = "dcp"  # a parallel run's checkpoint: model and optimizer state as DCP shards (softmoe.distributed)
TRAIN_CONFIG = "train_config.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_CHECKPOINT_FILES = (CONFIG_NAME, TRAIN_STATE)  # and the weights: WEIGHTS_NAME, or DCP_DIR of a parallel run


def checkpoint_dir(workdir: str | os.PathLike, step: int) -> Path:
    return Path(workdir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(workdir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of `workdir`, by step ascending."""
    root = Path(workdir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir() and all((entry / f).is_file() for f in _CHECKPOINT_FILES) and (
                (entry / WEIGHTS_NAME).is_file() or (entry / DCP_DIR / "COMPLETE").is_file()):
            out.append((int(m.group(1)), entry))
    return sorted(out)


def latest_checkpoint(workdir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of `workdir`, or None."""
    found = list_checkpoints(workdir)
    return found[-1][1] if found else None


def load_model(path: str | os.PathLike) -> tuple[VisionTransformer, dict | None]:
    """(model, training config dict or None) from a training workdir (its latest checkpoint),
    a checkpoint directory or a save_pretrained directory. The model is on the CPU in train
    mode, as from_pretrained returns it; the training config is the JSON dict as saved. `path`
    may also name a shipped model (softmoe.models.list_pretrained)."""
    p = Path(resolve_name(path))
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"checkpoint path {str(p)!r} must be a directory (workdir, checkpoint or save_pretrained dir)")
    ckpt = p
    if not (is_pretrained_dir(p) or is_dcp_dir(p)):
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"{str(p)!r} holds no model: expected {CONFIG_NAME} + {WEIGHTS_NAME} (or + "
                                    f"{DCP_DIR}/), or a training workdir with {CHECKPOINTS}/step_* checkpoints")
    model = from_pretrained(ckpt) if is_pretrained_dir(ckpt) else from_dcp(ckpt)
    return model, _training_config(ckpt, workdir=ckpt.parent.parent if ckpt != p else None)


def _training_config(ckpt: Path, workdir: Path | None) -> dict | None:
    """The training config saved with checkpoint `ckpt` (or in its work directory), or None."""
    for candidate in (ckpt / TRAIN_CONFIG, workdir / CONFIG_NAME if workdir is not None else None):
        if candidate is not None and candidate.is_file():
            try:
                doc = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict) and "model" in doc and "data" in doc:
                return doc
    return None


__all__ = ["save_pretrained", "from_pretrained", "load_config", "load_safetensors", "load_weights", "check_dtypes",
           "adapt_state_dict", "resample_pos_embed", "is_pretrained_dir", "load_model", "list_checkpoints",
           "latest_checkpoint", "checkpoint_dir", "CONFIG_NAME", "WEIGHTS_NAME", "save_config", "is_dcp_dir",
           "from_dcp", "DCP_DIR"]
