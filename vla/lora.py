"""LoRA fine-tuning through peft: adapters on the backbone, the action head trained fully.

Only the adapter (LoRA matrices + head + any other trainable tensors) is saved per checkpoint,
next to a pointer to the frozen base policy checkpoint it applies to.
"""
from __future__ import annotations

import json
import os
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


def load_adapter_checkpoint(path: Path, device: str | torch.device = "cpu"):
    """Base policy checkpoint + this adapter -> a ready policy."""
    from vla.policy import PREPROCESSOR_NAME, VLAPolicy

    meta = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    base = (path / meta["base_checkpoint"]).resolve()
    if not base.exists():
        raise FileNotFoundError(f"adapter {path} needs its base checkpoint {base}, which does not exist")
    policy = VLAPolicy.from_pretrained(base, device="cpu")
    apply_lora(policy, LoraConfig(enabled=True, r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
                                  target_modules=meta["target_modules"]))
    load_adapter_weights(policy, path / ADAPTER_WEIGHTS_NAME)
    if (path / PREPROCESSOR_NAME).exists():
        from vla.data.processor import Preprocessor

        policy.preprocessor = Preprocessor.from_state_dict(
            json.loads((path / PREPROCESSOR_NAME).read_text()), policy.config, policy.backbone.tokenize
        )
    return policy.to(device).eval()
