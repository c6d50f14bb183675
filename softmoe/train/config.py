"""TrainConfig: every knob of a training run, as one JSON-serialisable dataclass.

Configs are code: a file in configs/ defines `config() -> TrainConfig`. `--set key=value`
overrides a field, parsed by the field's type; `model=NAME` picks the registered model and
`model.KEY=VALUE` overrides its config (`model.patch_size=2`, `model.moe.num_experts=16`, see
`softmoe.models.config.parse_override`; `model_kwargs.KEY=VALUE` is the old spelling, still
accepted). Unknown keys and unparsable values raise ValueError with close-name suggestions.

Fields marked `resumable` (field metadata) change what is logged or saved, never the
weights: a run may be resumed with different values. Work directories saved before the model
section was typed (`"model": NAME, "model_kwargs": {...}`) load through `from_dict`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import typing
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from softmoe._fields import check_fields, check_keys, parse_text, split_assignment, unknown_key_message
from softmoe.models import ViTConfig, VisionTransformer, create_model, get_config
from softmoe.models.config import check_overrides, merge_overrides, parse_override
from softmoe.models.gpt import DECODER_CONFIGS, get_decoder_config

RESUMABLE = {"resumable": True}  # field metadata: may differ when a run is resumed


def _resumable(default):
    return field(default=default, metadata=RESUMABLE)


@dataclass
class ModelConfig:
    """The model of a run: a registry name (softmoe.models.list_models()) plus overrides of
    its ViTConfig, e.g. `ModelConfig("soft_moe_micro", {"patch_size": 2, "moe": {"num_experts": 16}})`.
    img_size / in_chans / num_classes are filled from the data unless given here."""
    name: str = "soft_moe_micro"
    # ViTConfig fields to change; `moe` takes a dict of MoEConfig fields changed on the registry
    # model's MoE section (or None: dense). Keys and value types are checked against ViTConfig /
    # MoEConfig on construction; values against the model when it is built.
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "ModelConfig")
        if not self.name:
            raise ValueError("model name must be a registry name (see `softmoe.models.list_models()`)")
        if self.name in DECODER_CONFIGS:  # a decoder (task="lm"): GPTConfig overrides, checked by building the config
            get_decoder_config(self.name, **self.overrides)
            return
        self.overrides = check_overrides(self.overrides)

    def vit_config(self) -> ViTConfig:
        """The model's validated ViTConfig (unknown name or bad override: ValueError)."""
        return get_config(self.name, **self.overrides)

    def build(self) -> VisionTransformer:
        return create_model(self.name, **self.overrides)


@dataclass
class TrainConfig:
    # model: a registry name plus overrides of its ViTConfig (a str is taken as ModelConfig(name))
    model: ModelConfig = field(default_factory=ModelConfig)
    # the old spelling of model.overrides, accepted from config files written before ModelConfig
    model_kwargs: InitVar[dict | None] = None
    # "classify" (the ViTs) or "lm" (a char-level decoder LM: softmoe/lm/; model = a decoder of
    # softmoe/models/gpt.py, data = the corpus, "pydoc" or a text file/folder)
    task: str = "classify"
    # data
    data: str = "digits"  # one of softmoe.data.DATASETS or an ImageFolder directory
    data_root: str | None = None  # where the dataset's files are (None: the default location)
    download: bool = False
    img_size: int | None = None  # model input side; None: the dataset's image side
    augment: str = "crop_flip"  # "inception_crop" (paper), "crop_flip" or "none"
    crop_padding: int | None = None  # crop_flip padding in pixels; None: image side // 8
    inception_area_min: float = 0.05  # inception_crop: smallest crop area fraction
    flip: bool = True  # horizontal flips in crop_flip / inception_crop (off for digits: not mirror-symmetric)
    skip_bad_images: bool = False  # ImageFolder: skip unreadable files instead of failing
    data_image_size: int | None = None  # ImageFolder: resize every image to this square while decoding
    test_split: str = "test"
    # fraction of the training set held out as a validation split (class-stratified, fixed:
    # softmoe.data.split); evaluations during training read it, the test set is scored once at the
    # end and reported beside it. 0: no validation split (evaluations read the test set).
    val_split: float = 0.0
    # length: exactly one of steps / epochs is > 0
    steps: int = 0
    epochs: float = 0.0
    batch_size: int = 128
    # optimiser (docs/design.md §4): Adam b1/b2, decoupled weight decay scaled by the learning rate
    optimizer: str = "adamw"  # "adamw" (decoupled decay, paper) or "adam" (L2 added to the gradient)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.03  # kernels and the router scale; never phi, biases, norms, pos embedding
    head_weight_decay: float | None = None  # the head kernel's decay (paper: 3.0); None: weight_decay
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    # schedule
    schedule: str = "rsqrt"  # "rsqrt" (warmup, rsqrt decay, linear cooldown), "cosine", "constant"
    warmup_steps: int = 0
    rsqrt_timescale: int = 10_000
    cooldown_steps: int = 0  # rsqrt: linear cooldown to 0 over the last cooldown_steps
    min_lr: float = 0.0  # cosine: final learning rate
    # loss
    loss: str = "softmax"  # "softmax" cross-entropy or "sigmoid" (binary CE summed over classes)
    label_smoothing: float = 0.0
    aux_loss_weight: float = 1.0  # multiplies softmoe.collect_aux_loss(model) (already weighted per layer)
    # numerics / device
    device: str = _resumable("auto")  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    bf16: bool | None = None  # bf16 autocast; None: on for CUDA, off on CPU
    seed: int = 0
    num_threads: int = _resumable(0)  # torch intra-op threads on CPU; 0: leave torch's default
    # CPU: MoE layers reuse last step's weight-gradient and activation buffers (no page faults
    # per step; the model's peak can grow by up to the experts' weight size). False: fresh buffers.
    reuse_buffers: bool = _resumable(True)
    # parallelism under torchrun (softmoe/train/parallel.py): experts sharded over ep_size ranks,
    # data over world / ep_size; a checkpoint resumes at any layout
    ep_size: int = _resumable(1)
    # HSDP (docs/distributed.md "HSDP"): FSDP2 shards every parameter within each of dp_replicate
    # groups of world / (ep_size x dp_replicate) x ep_size ranks (one node, say) and replicates it
    # across the groups; needs data_parallel="fsdp" and must divide world / ep_size. 1: plain FSDP2.
    # Resumable like ep_size: the same math at any layout, and a DCP checkpoint loads at any layout.
    dp_replicate: int = _resumable(1)
    # the data-parallel engine under torchrun: "fsdp" (FSDP2: every parameter and its optimizer
    # state sharded, experts over their dp group) or "ddp" (DDP for the replicated parameters,
    # experts sharded over ep only, replicated over dp: less communication, more memory)
    data_parallel: str = _resumable("fsdp")
    dist_timeout_s: float = _resumable(300.0)  # a collective waiting longer (a dead rank) raises
    # memory and speed of the step (docs/distributed.md "Gradient accumulation, activation
    # checkpointing, compile"); resumable: the same math, a resume with other values is not bitwise
    # gradient accumulation: each rank's batch_size / world rows run as micro-batches of this many
    # rows, one clip and update per step; 0: no accumulation. The step's gradient is that of the
    # whole global batch.
    micro_batch_size: int = _resumable(0)
    # "none", "full" (every transformer block recomputed in the backward) or "selective" (the
    # blocks' attention and LayerNorms recomputed, the MLP / MoE layers' activations saved)
    activation_checkpoint: str = _resumable("none")
    compile: bool = _resumable(False)  # torch.compile every transformer block (not the whole model)
    checkpoint_timeout_s: float = _resumable(1800.0)  # the collectives around checkpoint I/O (slow disks)
    # under torchrun: write the DCP shards in the background (DCP async_save from a CPU snapshot of
    # the state) while training goes on, so a big model's step does not wait for the disk; a save
    # is finished (COMPLETE, renamed to step_N) at the next save or the run's end. Costs one CPU
    # copy of the rank's weights and optimizer state. A single process saves synchronously anyway.
    checkpoint_async: bool = _resumable(False)
    # logging, evaluation, checkpoints (resumable: they change what is logged or saved, never the weights)
    log_every: int = _resumable(10)
    eval_every: int = _resumable(0)  # test accuracy every N steps (0: only at the end)
    eval_batch_size: int = _resumable(512)
    routing_metrics_every: int = _resumable(50)  # MoE routing metrics every N steps (0: never)
    checkpoint_every: int = _resumable(500)  # 0: only at the end
    keep_checkpoints: int = _resumable(3)
    tensorboard: bool = _resumable(True)  # write TensorBoard logs when tensorboard is importable
    plots: bool = _resumable(True)
    workdir: str = _resumable("runs/default")

    def __post_init__(self, model_kwargs: dict | None) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(self.model)
        if model_kwargs is not None and isinstance(self.model, ModelConfig):
            overrides = merge_overrides(self.model.overrides, check_overrides(model_kwargs))
            self.model = ModelConfig(self.model.name, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The validated config of a `to_dict()` dict, or of one saved in the old format
        (`"model": NAME` plus `"model_kwargs": {...}`)."""
        if not isinstance(d, dict):
            raise ValueError(f"a train config must be a dict, got {type(d).__name__}")
        check_keys(d, cls, "config key", extra=("model_kwargs",))
        model = d.get("model", {})
        if isinstance(model, dict):
            check_keys(model, ModelConfig, "model config key")
            model = ModelConfig(**model)
        elif not isinstance(model, str):
            raise ValueError(f"config key 'model' must be a registry name or a dict of name and overrides, "
                             f"got {model!r}")
        return cls(**{**d, "model": model}).validate()

    def validate(self) -> TrainConfig:
        """Check every field; ValueError naming the field and what it accepts."""
        check_fields(self, "TrainConfig")
        choice = {"augment": ("inception_crop", "crop_flip", "none"), "optimizer": ("adamw", "adam"),
                  "schedule": ("rsqrt", "cosine", "constant"), "loss": ("softmax", "sigmoid"),
                  "test_split": ("test", "val"), "task": ("classify", "lm"),
                  "data_parallel": ("fsdp", "ddp"), "activation_checkpoint": ("none", "full", "selective")}
        for key, allowed in choice.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if (self.steps > 0) == (self.epochs > 0):
            raise ValueError(f"set exactly one of steps > 0 or epochs > 0, got steps={self.steps}, "
                             f"epochs={self.epochs}")
        if self.steps < 0 or self.epochs < 0:
            raise ValueError(f"steps and epochs must be >= 0, got steps={self.steps}, epochs={self.epochs}")
        positive = ["batch_size", "eval_batch_size", "log_every", "keep_checkpoints", "rsqrt_timescale", "ep_size",
                    "dp_replicate", "dist_timeout_s", "checkpoint_timeout_s"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        nonneg = ["warmup_steps", "cooldown_steps", "eval_every", "checkpoint_every", "routing_metrics_every",
                  "num_threads", "grad_clip", "weight_decay", "min_lr", "aux_loss_weight", "seed"]
        for key in nonneg:
            v = getattr(self, key)
            if v < 0 or (isinstance(v, float) and not math.isfinite(v)):
                raise ValueError(f"{key} must be a finite number >= 0, got {v}")
        if self.dp_replicate > 1 and self.data_parallel != "fsdp":
            raise ValueError(f"dp_replicate={self.dp_replicate} (HSDP) needs data_parallel='fsdp', got "
                             f"data_parallel={self.data_parallel!r}; use dp_replicate=1 with 'ddp'")
        self._check_step_options()
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")
        if self.num_threads > 4 * (os.cpu_count() or 1):  # more only slows down, 100000 aborts torch
            raise ValueError(f"num_threads must be <= 4x this machine's {os.cpu_count()} CPUs (0: torch's default), "
                             f"got {self.num_threads}")
        hwd = self.head_weight_decay
        if hwd is not None and not (hwd >= 0 and math.isfinite(hwd)):
            raise ValueError(f"head_weight_decay must be >= 0 or None, got {self.head_weight_decay}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 or not self.eps > 0:
            raise ValueError(f"need 0 <= beta1, beta2 < 1 and eps > 0, got beta1={self.beta1}, beta2={self.beta2}, "
                             f"eps={self.eps}")
        if not 0 <= self.val_split < 1:
            raise ValueError(f"val_split must be a fraction in [0, 1) (0: none), got {self.val_split}")
        if self.val_split and self.test_split == "val":
            raise ValueError("test_split='val' reads a val/ folder of the dataset; with val_split > 0 the validation "
                             "split is held out of train: use test_split='test'")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.inception_area_min <= 1:
            raise ValueError(f"inception_area_min must be in (0, 1], got {self.inception_area_min}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"img_size must be >= 1 or None, got {self.img_size}")
        if self.data_image_size is not None and self.data_image_size < 1:
            raise ValueError(f"data_image_size must be >= 1 or None, got {self.data_image_size}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 or None, got {self.crop_padding}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        return self

    def _check_step_options(self) -> None:
        """micro_batch_size (divides batch_size); the vision trainer's options (accumulation,
        activation checkpointing, compile, parallel layouts, async checkpoints) unset for task='lm'."""
        m = self.micro_batch_size
        if m < 0:
            raise ValueError(f"micro_batch_size must be >= 0 (0: no gradient accumulation), got {m}")
        if m and self.batch_size % m:
            raise ValueError(f"micro_batch_size={m} must divide batch_size={self.batch_size} (each rank runs its "
                             f"batch_size / world rows as micro-batches of micro_batch_size rows)")
        if self.task != "lm":
            return
        # the char-LM loop (softmoe/lm/train.py) runs in one process, unaccumulated, eager and
        # synchronously checkpointed: a field it would ignore is an error, never a silent no-op
        set_ = {"micro_batch_size": m != 0, "activation_checkpoint": self.activation_checkpoint != "none",
                "compile": self.compile, "checkpoint_async": self.checkpoint_async, "ep_size": self.ep_size != 1,
                "dp_replicate": self.dp_replicate != 1}
        if any(set_.values()):
            given = ", ".join(f"{k}={getattr(self, k)!r}" for k, on in set_.items() if on)
            raise ValueError(f"micro_batch_size, activation_checkpoint, compile, checkpoint_async, ep_size and "
                             f"dp_replicate apply to task='classify' only (the char-LM loop trains in one process); "
                             f"leave them at 0, 'none', false, false, 1 and 1 for task='lm', got {given}")


def resumable_fields() -> set[str]:
    """TrainConfig fields that may differ when a run is resumed (marked `resumable`)."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """A new, validated TrainConfig with each "key=value" applied: a field (parsed by its
    type), `model=NAME`, `model.name=NAME`, `model.KEY=VALUE` (a model override, see
    `softmoe.models.config.parse_override`), `model.overrides={json}` (all overrides at once)
    or the old spellings `model_kwargs.KEY=VALUE` / `model_kwargs={json}`."""
    d = cfg.to_dict()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in assignments:
        key, text = split_assignment(item)
        head, _, sub = key.partition(".")
        if head == "model_kwargs":
            head, sub = "model", sub or "overrides"
        if head not in fields:
            raise ValueError(unknown_key_message(head, fields))
        if head == "model":
            d["model"] = _set_model(d["model"], key, sub or "name", text)
        elif sub:
            raise ValueError(f"--set {key}: {head!r} takes no '.subkey'")
        else:
            d[head] = parse_text(key, text, _hints()[head])
    return TrainConfig.from_dict(d)


def _set_model(model: dict, key: str, sub: str, text: str) -> dict:
    """The model section dict with `--set key=text` applied (sub: the part after "model.")."""
    if sub == "name":
        return {**model, "name": parse_text(key, text, str)}
    if sub == "overrides":
        return {**model, "overrides": parse_text(key, text, dict)}
    prefix = key[:len(key) - len(sub)]  # "model." or "model_kwargs."
    return {**model, "overrides": merge_overrides(model["overrides"], parse_override(sub, text, prefix))}


def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def config_search_dirs() -> list[Path]:
    """Where `--config NAME` looks: $SOFTMOE_CONFIG_DIR, ./configs, then the repository's configs/."""
    dirs = []
    if os.environ.get("SOFTMOE_CONFIG_DIR"):
        dirs.append(Path(os.environ["SOFTMOE_CONFIG_DIR"]))
    dirs.append(Path.cwd() / "configs")
    dirs.append(Path(__file__).resolve().parents[2] / "configs")
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            out.append(d)
    return out


def available_configs() -> list[str]:
    names = set()
    for d in config_search_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.py") if not p.name.startswith("_"))
    return sorted(names)


def load_config(name_or_path: str) -> TrainConfig:
    """Run a config file (a path, or NAME found as NAME.py in `config_search_dirs()`) and
    return its `config()`. Config files are code the user chose to run, like any script."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"config must be a name or a path, got {name_or_path!r}")
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [d / f"{name_or_path}.py" for d in config_search_dirs()] if path.suffix != ".py" else []
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            avail = available_configs()
            close = difflib.get_close_matches(name_or_path, avail, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise FileNotFoundError(f"config {name_or_path!r} not found: give a .py file or one of {avail}{hint}")
    if path.suffix != ".py":
        raise ValueError(f"config {str(path)!r} must be a Python file (.py) defining config() -> TrainConfig; "
                         f"a run's saved config.json is not a config file (resume with --workdir instead)")
    spec = importlib.util.spec_from_file_location(f"softmoe_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "config", None)
    if not callable(fn):
        raise ValueError(f"config file {str(path)!r} must define a function config() -> TrainConfig")
    cfg = fn()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config() in {str(path)!r} must return a TrainConfig, got {type(cfg).__name__}")
    return cfg.validate()
