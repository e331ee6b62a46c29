"""Configuration dataclasses (draccus) and the preset-aware parser.

Backbones and heads are draccus choice registries: a component registers its config class with
``@BackboneConfig.register_subclass("name")`` / ``@HeadConfig.register_subclass("name")`` and the
CLI accepts ``--backbone.type=name --backbone.some_field=...``. The config class builds the module
(``build()``), so a registered name can never point at nothing.
"""
from __future__ import annotations

import dataclasses
import io
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import draccus
import yaml

from vla.registry import UnknownNameError, choice_names, unknown_name_message


@dataclass
class BackboneConfig(draccus.ChoiceRegistry):
    """Base of all backbone configs. Subclasses implement ``build() -> Backbone`` and
    ``tiny_variants()`` (small random instances the test-suite runs through every contract test)."""

    @classmethod
    def tiny_variants(cls) -> dict[str, "BackboneConfig"]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{cls.__name__}.tiny_variants")

    def build(self, assets_dir=None):  # pragma: no cover - abstract
        """Build the backbone. ``assets_dir`` (a checkpoint's ``backbone/`` folder, written by
        ``Backbone.save_assets``) means: rebuild the architecture from the files there and skip
        loading pretrained weights, because the checkpoint's own weights are loaded next."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    @property
    def type(self) -> str:
        return self.get_choice_name(type(self))


@dataclass
class HeadConfig(draccus.ChoiceRegistry):
    """Base of all action-head configs. Subclasses implement ``build(backbone, policy_cfg) -> ActionHead``
    and ``tiny()`` (a small instance for the parametrized contract tests)."""

    @classmethod
    def tiny(cls) -> "HeadConfig":  # pragma: no cover - abstract
        raise NotImplementedError(f"{cls.__name__}.tiny")

    def build(self, backbone, policy: "PolicyConfig"):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.build")

    @property
    def type(self) -> str:
        return self.get_choice_name(type(self))


@dataclass
class NormalizationConfig:
    # "mean_std": (x - mean) / std ; "quantile": map [q01, q99] to [-1, 1] ; "identity": unchanged
    state: str = "mean_std"
    action: str = "mean_std"
    eps: float = 1e-6  # floor for std / range: a constant feature maps to 0, never NaN


@dataclass
class PolicyConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig.get_choice_class("timm_lm")())
    head: HeadConfig = field(default_factory=lambda: HeadConfig.get_choice_class("flow_matching")())
    chunk_size: int = 8  # H: actions predicted per chunk
    n_action_steps: int = 8  # actions executed from each chunk before re-planning
    max_state_dim: int = 8  # S: state is zero-padded to this, with a mask
    max_action_dim: int = 8  # A: actions are zero-padded to this, with a mask
    cameras: list[str] = field(default_factory=lambda: ["cam0"])  # the model's camera slots, in order
    image_size: int = 128  # images are resized to (image_size, image_size)
    max_prompt_len: int = 32  # prompt tokens (longer prompts are an error, not a truncation)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    # Inference under bf16 autocast (backbone and head; the flow integration state, the selectors' scores and
    # the returned actions stay fp32). On CPUs with bf16 units (AMX) it makes N candidates cheaper relative
    # to one; set at load time: `vla eval|serve --policy.inference_bf16=true`. Training ignores it (--bf16).
    inference_bf16: bool = False


@dataclass
class DatasetConfig:
    root: str | None = None  # local LeRobot dataset folder
    repo_id: str = "local/dataset"  # hub id (or a name for a local root)
    # Generate a small learnable synthetic dataset at `root` if it does not exist (debug preset).
    synthetic: bool = False
    # dataset camera key -> model camera slot, e.g. {"observation.images.top": "cam0"}; empty = in order
    camera_map: dict[str, str] = field(default_factory=dict)
    state_key: str = "observation.state"
    action_key: str = "action"
    episodes: list[int] | None = None  # subset of episodes (None = all)
    video_backend: str | None = None  # None = lerobot's default (torchcodec when present)
    # Augmentation at train time: random crop of this fraction of the side, then resize back.
    crop_scale: float = 1.0
    # Mixtures (`vla pretrain --mixture=[...]`): the name its normalization statistics are kept under in
    # the checkpoint (None = the folder / repo name; datasets of one robot may share a name), and the
    # relative sampling weight (see PretrainConfig.sample_by).
    embodiment: str | None = None
    weight: float = 1.0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Module-name regex inside the backbone that LoRA wraps (None = the backbone's own `lora_targets()`:
    # the language model's attention projections); the head always trains fully.
    target_modules: str | None = None


@dataclass
class TrainConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    output_dir: str = "outputs/train"
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    backbone_lr_scale: float = 1.0  # lr multiplier for backbone params (pretrained encoders like lower)
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    # > 0: keep an exponential moving average of the trainable weights (e.g. 0.999, warmed up) and save
    # it as the checkpoint's policy; the raw weights go into training_state.pt for --resume.
    ema_decay: float = 0.0
    bf16: bool = False  # autocast matmuls to bf16 on CPU/GPU
    # > 0 (needs a frozen vision encoder): encode every frame once under this many random-crop views
    # and train from memory, skipping video decoding and the encoder each step (vla/data/feature_cache.py).
    cache_features: int = 0
    # With cache_features: keep the cache on disk in this folder, keyed by what it depends on (dataset files,
    # preprocessing, encoder weights, views, seed, batch size, bf16); a run with the same key loads it.
    cache_dir: str | None = None
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 500  # 0 = only at the end
    keep_last: int = 2  # periodic checkpoints kept on disk
    resume: bool = False  # continue from output_dir/checkpoints/last
    # Exit after this many optimizer steps in THIS run (time-sliced jobs); the schedule still follows
    # `steps`, and `--resume=true` continues exactly where it stopped.
    stop_after: int | None = None
    init_from: str | None = None  # start from the weights of this policy checkpoint (fine-tuning)
    # With init_from: re-fit a token head's action tokenizer to this dataset, carrying the learned token
    # embeddings over (adaptive grid: interpolated onto the new bin centres, SpatialVLA).
    refit_tokenizer: bool = False
    device: str = "auto"  # auto | cpu | cuda
    torch_threads: int = 0  # 0 = torch default


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine of ``vla pretrain`` (see docs/pretraining.md)."""

    zero_stage: int = 2  # 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: bool = False  # optimizer states and step on the CPU (DeepSpeedCPUAdam)
    activation_checkpointing: bool = False  # recompute transformer blocks in backward (less memory)
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default 1e5).
    param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduction bucket
    overlap_comm: bool = False  # overlap gradient reduction with backward (helps on GPUs)
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    config_file: str | None = None  # a DeepSpeed JSON whose keys override the generated config


@dataclass
class PretrainConfig(TrainConfig):
    """``vla pretrain``: TrainConfig + the DeepSpeed engine + a dataset mixture.

    ``batch_size`` is per process (DeepSpeed's micro batch); one optimizer step sees
    batch_size x grad_accum x world_size samples.
    """

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Several LeRobot datasets (different cameras, state/action dims, robots); empty = `dataset` alone.
    mixture: list[DatasetConfig] = field(default_factory=list)
    # "dataset": P(dataset) proportional to its weight; "frame": proportional to weight x frames.
    sample_by: str = "dataset"
    # The embodiment whose statistics a loaded checkpoint uses by default (None = the first dataset's).
    default_embodiment: str | None = None


# ---------------------------------------------------------------------------------------------
# Parsing: a preset supplies the defaults, CLI flags override them.

# Config fields that are draccus choice registries, by field name: `--<name>.type=x` is checked
# against the registered names (with a suggestion) and switching type resets that sub-tree.
# Packages outside `vla` add theirs with `register_choice_field` (tokenizers, robots, ...).
_CHOICE_FIELDS: dict[str, type] = {"backbone": BackboneConfig, "head": HeadConfig}


def register_choice_field(name: str, base: type) -> None:
    _CHOICE_FIELDS[name] = base
# Short CLI aliases: `--head.type=x` means `--policy.head.type=x`.
_ALIASES = ("backbone", "head")


def _normalize_args(args: Sequence[str], aliases: bool = True) -> list[str]:
    if not aliases:
        return list(args)
    out: list[str] = []
    for a in args:
        for alias in _ALIASES:
            if a.startswith(f"--{alias}.") or a.startswith(f"--{alias}="):
                a = "--policy." + a[2:]
        out.append(a)
    return out


def _check_choice(kind: str, base: type, name: str) -> None:
    if name not in choice_names(base):
        raise UnknownNameError(unknown_name_message(kind, name, choice_names(base)))


def to_dict(cfg: Any) -> dict:
    """Config dataclass -> plain dict (with ``type`` keys for choices), via draccus."""
    buf = io.StringIO()
    draccus.dump(cfg, buf)
    return yaml.safe_load(buf.getvalue()) or {}


def from_dict(cls: type, data: dict) -> Any:
    return draccus.decode(cls, data)


def parse_config(cls: type, base: Any | None, args: Sequence[str], aliases: bool = True) -> Any:
    """Parse ``args`` (``--a.b=c``) over the defaults in ``base`` (a preset instance).

    Switching a choice (``--head.type=discrete``) resets that sub-config to the new type's defaults
    instead of feeding it the old type's fields. Unknown choice names fail with the known names.
    ``aliases``: read ``--head.x`` as ``--policy.head.x`` (training configs); False when ``cls`` is
    the policy config itself.
    """
    args = _normalize_args(args, aliases)
    data = to_dict(base) if base is not None else {}
    for a in args:
        m = re.match(r"--((?:[\w]+\.)*)([\w]+)\.type=(.+)$", a)
        if not m:
            continue
        path = (m.group(1) + m.group(2)).split(".")
        kind = path[-1]
        if kind in _CHOICE_FIELDS:
            _check_choice(kind, _CHOICE_FIELDS[kind], m.group(3))
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
        if isinstance(node.get(path[-1]), dict) and node[path[-1]].get("type") != m.group(3):
            # The new type's full defaults (not just its name): nested choices (a head's tokenizer) then
            # carry their own `type`, so `--head.tokenizer.steps=20` alone still parses.
            fresh = {"type": m.group(3)}
            if kind in _CHOICE_FIELDS:
                fresh = {**to_dict(_CHOICE_FIELDS[kind].get_choice_class(m.group(3))()), "type": m.group(3)}
            node[path[-1]] = fresh
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
        path = f.name
    try:
        return draccus.parse(cls, config_path=path, args=args)
    finally:
        import os

        os.unlink(path)


def policy_overrides(extra: Sequence[str]) -> list[str]:
    """Command-line leftovers ``--policy.FIELD=VALUE`` (``vla eval``, ``vla serve``) -> ``--FIELD=VALUE``
    overrides for ``VLAPolicy.from_pretrained``; anything else is a ValueError naming it."""
    bad = [a for a in extra if not (a.startswith("--policy.") and "=" in a)]
    if bad:
        raise ValueError(f"unrecognized arguments: {' '.join(bad)} (a checkpoint's config is overridden with "
                         "--policy.FIELD=VALUE, e.g. --policy.head.temperature=0)")
    return ["--" + a[len("--policy."):] for a in extra]


def parse_args_with_overrides(parser: Any, argv: Sequence[str] | None) -> tuple[Any, list[str]]:
    """``parser.parse_known_args(argv)`` whose leftovers must be ``--policy.FIELD=VALUE`` -> (args, overrides);
    anything else ends in ``parser.error`` naming it (the commands that take a checkpoint's overrides)."""
    args, extra = parser.parse_known_args(argv)
    try:
        return args, policy_overrides(extra)
    except ValueError as e:
        parser.error(str(e))
        raise  # parser.error exits; for parsers that were told not to


# Fields of a trained policy's config that change how it acts but not what it learned: overriding them
# at load time is what the overrides are for. Any other field is allowed (experiments) with a warning.
EXECUTION_FIELDS = ("inference_bf16", "head.temperature", "head.top_k", "head.greedy", "head.greedy_first",
                    "head.num_steps", "head.max_resample", "head.resample_temperature", "head.constrain_length",
                    "n_action_steps",
                    # training-time only: which weights get gradients / start from ImageNet / target noise
                    "backbone.freeze_vision", "backbone.freeze_language", "backbone.pretrained_vision",
                    "head.code_noise", "head.scale_loss")


def check_override_fields(cfg: Any, args: Sequence[str]) -> None:
    """Each ``--a.b=value`` in ``args`` must name a field path of the config instance ``cfg``; else a
    ValueError naming the override and listing the fields where the path went wrong. A field outside
    ``EXECUTION_FIELDS`` is logged as a warning: the weights were trained with the saved value."""
    import logging

    for a in args:
        m = re.match(r"--([\w.]+)=(.*)$", a, re.S)
        if not m:
            raise ValueError(f"override {a!r}: expected --field.path=value")
        node = cfg
        for part in m.group(1).split("."):
            names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
            if part not in names:
                raise ValueError(f"override {a!r}: {type(node).__name__} has no field {part!r}; "
                                 f"its fields: {', '.join(names) or 'none (not a config section)'}")
            node = getattr(node, part)
        if m.group(1) not in EXECUTION_FIELDS:
            logging.getLogger(__name__).warning(
                "override %s: %s is not an execution setting (%s); the weights were trained with the saved value",
                a, m.group(1), ", ".join(EXECUTION_FIELDS))


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
