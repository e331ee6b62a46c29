"""LoRA fine-tuning through peft: adapters on the backbone, the action head trained fully.

Only the adapter (LoRA matrices + head + any other trainable tensors) is saved per checkpoint,
next to a pointer to the frozen base policy checkpoint it applies to.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from vla.config import LoraConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"


def apply_lora(policy, cfg: LoraConfig, adapter_name: str = "default") -> None:
    """Inject LoRA layers into ``policy.backbone`` and freeze the backbone's base weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    target = cfg.target_modules or policy.backbone.lora_targets()
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target)
    policy.backbone.requires_grad_(False)
    inject_adapter_in_model(peft_cfg, policy.backbone, adapter_name=adapter_name)
    n = sum(1 for name, _ in policy.backbone.named_parameters() if "lora_" in name)
    if n == 0:
        raise ValueError(f"lora.target_modules={target!r} matched no module of the {type(policy.backbone).__name__}")
    for name, p in policy.backbone.named_parameters():
        p.requires_grad_("lora_" in name)


def trainable_state_dict(policy) -> dict[str, Tensor]:
    """What an adapter checkpoint holds: every trainable tensor (LoRA + head)."""
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    return {k: v for k, v in policy.state_dict().items() if k in names}


def save_adapter_checkpoint(policy, path: Path, base: str, cfg: LoraConfig) -> None:
    from safetensors.torch import save_file

    from vla.policy import PREPROCESSOR_NAME

    path.mkdir(parents=True, exist_ok=True)
    # Relative to the adapter folder, so a copied or moved output folder keeps working.
    rel = os.path.relpath(Path(base).resolve(), path.resolve())
    meta = {"base_checkpoint": rel, "r": cfg.r, "alpha": cfg.alpha,
            "dropout": cfg.dropout, "target_modules": cfg.target_modules or policy.backbone.lora_targets()}
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(policy).items()},
              str(path / ADAPTER_WEIGHTS_NAME))
    if policy.preprocessor is not None:
        (path / PREPROCESSOR_NAME).write_text(json.dumps(policy.preprocessor.state_dict(), indent=1))


def load_adapter_weights(policy, file: Path) -> None:
    """Load adapter tensors into a policy that already has LoRA applied; keys must match exactly."""
    from safetensors.torch import load_file

    weights = load_file(str(file))
    _, unexpected = policy.load_state_dict(weights, strict=False)
    missing = sorted(set(trainable_state_dict(policy)) - set(weights))
    if unexpected or missing:
        raise RuntimeError(f"adapter {file}: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}")


def read_adapter_config(path: str | Path) -> tuple[dict, Path, LoraConfig]:
    """An adapter checkpoint's metadata, the resolved path of its base checkpoint, and its LoRA config."""
    path = Path(path)
    file = path / ADAPTER_CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"{path} is not a LoRA adapter checkpoint: no {ADAPTER_CONFIG_NAME} in it")
    meta = json.loads(file.read_text())
    base = (path / meta["base_checkpoint"]).resolve()
    if not base.exists():
        raise FileNotFoundError(f"adapter {path} needs its base checkpoint {base}, which does not exist")
    cfg = LoraConfig(enabled=True, r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
                     target_modules=meta["target_modules"])
    return meta, base, cfg


def load_adapter_checkpoint(path: Path, device: str | torch.device = "cpu", embodiment: str | None = None):
    """Base policy checkpoint + this adapter -> a ready policy."""
    from vla.policy import PREPROCESSOR_NAME, SELECTOR_DIR, VLAPolicy

    _, base, lora_cfg = read_adapter_config(path)
    policy = VLAPolicy.from_pretrained(base, device="cpu", embodiment=embodiment)
    apply_lora(policy, lora_cfg)
    load_adapter_weights(policy, path / ADAPTER_WEIGHTS_NAME)
    # Selectors fitted for the adapted policy (`vla post-train cfn --policy ADAPTER`) live next to the
    # adapter, not in the base checkpoint: the base's CFN scores the base policy's features.
    policy.selector_dir = path / SELECTOR_DIR
    if (path / PREPROCESSOR_NAME).exists():
        from vla.data.processor import Preprocessor

        policy.preprocessor = Preprocessor.from_state_dict(
            json.loads((path / PREPROCESSOR_NAME).read_text()), policy.config, policy.backbone.tokenize,
            embodiment=embodiment)
    return policy.to(device).eval()


# ----- several named adapters on one base (the policy server: one LoRA adapter per embodiment) -----
DEFAULT_ADAPTER = "default"  # the peft adapter name training uses; saved keys carry it (lora_A.default.weight)
_ADAPTER_KEY = re.compile(r"(\.lora_[A-Za-z_]+)\.([^.]+)(\.|$)")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_adapter_name(name: str) -> str:
    # peft stores adapters in ModuleDicts keyed by name: a dot would break the state-dict paths.
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-', received {name!r}")
    return name


def rename_adapter_keys(weights: dict[str, Tensor], new: str, old: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.<new>.weight`` (non-LoRA keys unchanged)."""
    check_adapter_name(new)
    out = {}
    for k, v in weights.items():
        m = _ADAPTER_KEY.search(k)
        if m is not None:
            if m.group(2) != old:
                raise ValueError(f"adapter key {k!r} names adapter {m.group(2)!r}, expected {old!r}")
            k = k[: m.start()] + f"{m.group(1)}.{new}{m.group(3)}" + k[m.end():]
        out[k] = v
    return out


def add_named_adapter(backbone: torch.nn.Module, name: str, cfg: LoraConfig) -> None:
    """Inject one more LoRA adapter called ``name`` into ``backbone`` (already injected ones stay).

    Unlike `apply_lora` it leaves every weight frozen, the new LoRA tensors included: it is for serving
    several adapters on one base, where adapter tensors are loaded from checkpoints, never trained."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    check_adapter_name(name)
    if name in adapter_names(backbone):
        raise ValueError(f"adapter {name!r} is already injected into the {type(backbone).__name__}")
    target = cfg.target_modules or backbone.lora_targets()
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target)
    with warnings.catch_warnings():  # "multiple adapters in the model": exactly the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(peft_cfg, backbone, adapter_name=name)
    if name not in adapter_names(backbone):
        raise ValueError(f"lora.target_modules={target!r} matched no module of the {type(backbone).__name__}")
    backbone.requires_grad_(False)


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(module: torch.nn.Module) -> set[str]:
    """Names of the LoRA adapters injected into ``module``."""
    names: set[str] = set()
    for layer in _lora_layers(module):
        names.update(getattr(layer, "lora_A", {}).keys())
    return names


def set_active_adapter(module: torch.nn.Module, name: str | None) -> None:
    """Route every LoRA layer of ``module`` through adapter ``name``; ``None`` = the plain base weights.

    A flag per layer: no weight is copied or merged, so switching costs microseconds per layer."""
    layers = _lora_layers(module)
    if name is not None and not any(name in getattr(layer, "lora_A", {}) for layer in layers):
        raise KeyError(f"adapter {name!r} is not injected; injected adapters: {sorted(adapter_names(module))}")
    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name, inference_mode=True)  # after enable: it leaves every LoRA weight frozen
