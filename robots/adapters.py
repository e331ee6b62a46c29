"""One base policy, several LoRA adapters (one per embodiment), switched per request without reloading.

An adapter checkpoint from ``vla train --lora.enabled=true`` holds LoRA matrices for the backbone, the
whole action head (LoRA training trains the head fully), and its own ``preprocessor.json`` (camera
map, state/action dims and the normalization statistics of its embodiment's dataset). Serving N of
them keeps ONE backbone in memory with N named peft adapters injected, plus N heads and N
preprocessors. Switching routes the LoRA layers to the adapter (a flag per layer) and points the
policy at the adapter's head and preprocessor: no tensor is copied and nothing is read from disk.

    reg = AdapterRegistry.load("runs/base/pretrained_model", {"so100": "runs/so100/...", "koch": "..."})
    chunk = reg.predict("so100", raw_obs)      # (H, A) with so100's normalization stats

The base policy itself is served as ``"base"`` (its own head and preprocessor, LoRA disabled).
"""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

BASE = "base"


@dataclass
class _Entry:
    name: str
    path: Path | None
    head: Any  # nn.Module
    preprocessor: Any
    lora: str | None  # peft adapter name; None = LoRA disabled (the base policy)


class AdapterRegistry:
    """Named embodiments on one base `VLAPolicy`. Thread-safe: `predict` holds a lock from the
    adapter switch to the end of inference, so concurrent callers never mix adapters."""

    def __init__(self, policy: Any, base_path: str | Path | None = None) -> None:
        self.policy = policy
        self.base_path = None if base_path is None else Path(base_path).resolve()
        self._entries: dict[str, _Entry] = {BASE: _Entry(BASE, self.base_path, policy.head, policy.preprocessor, None)}
        self._active = BASE
        self._lock = threading.RLock()
        self.switches = 0  # adapter switches so far (each one a pointer swap, see the module doc)
        self.default = BASE

    # ----- building ---------------------------------------------------------------------------
    @classmethod
    def load(cls, policy_path: str | Path, adapters: Mapping[str, str | Path] | None = None,
             device: str = "cpu", overrides: Sequence[str] = ()) -> "AdapterRegistry":
        """The base checkpoint at ``policy_path`` plus named adapter checkpoints.

        ``policy_path`` may itself be an adapter checkpoint: its base is loaded and it is served as
        ``"default"`` (and is the default for requests that name no adapter). ``overrides``: ``--FIELD=VALUE``
        over the base's config (``VLAPolicy.from_pretrained``)."""
        from vla.lora import ADAPTER_CONFIG_NAME, read_adapter_config
        from vla.policy import VLAPolicy

        path = Path(policy_path)
        adapters = dict(adapters or {})
        default = BASE
        if (path / ADAPTER_CONFIG_NAME).exists():
            if "default" in adapters:
                raise ValueError("--policy is an adapter checkpoint, served as 'default': "
                                 "give the other adapters another name")
            _, path, _ = read_adapter_config(path)
            adapters = {"default": policy_path, **adapters}
            default = "default"
        t0 = time.perf_counter()
        reg = cls(VLAPolicy.from_pretrained(path, device=device, overrides=overrides), path)
        reg.base_load_s = time.perf_counter() - t0
        for name, p in adapters.items():
            reg.add(name, p)
        reg.default = default
        return reg

    def add(self, name: str, path: str | Path) -> None:
        """Register the adapter checkpoint at ``path`` as ``name``. It must have been trained on this
        registry's base checkpoint (checked through its ``adapter_config.json``)."""
        from safetensors.torch import load_file

        from vla.lora import (
            ADAPTER_WEIGHTS_NAME,
            add_named_adapter,
            check_adapter_name,
            read_adapter_config,
            rename_adapter_keys,
            set_active_adapter,
        )
        from vla.policy import PREPROCESSOR_NAME

        check_adapter_name(name)
        if name in self._entries:
            raise ValueError(f"adapter {name!r} is already registered; registered: {self.names}")
        path = Path(path)
        _, base, lora_cfg = read_adapter_config(path)
        if self.base_path is not None and base != self.base_path:
            raise ValueError(f"adapter {name!r} ({path}) was trained on the base checkpoint {base}, "
                             f"but this server's base is {self.base_path}")
        weights = load_file(str(path / ADAPTER_WEIGHTS_NAME))
        lora_w = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        head_w = {k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")}
        other = sorted(k for k in weights if not k.startswith(("backbone.", "head.")))
        not_lora = sorted(k for k in lora_w if "lora_" not in k)
        if other or not_lora:
            raise ValueError(f"adapter {path}: tensors outside the backbone's LoRA layers and the head cannot be "
                             f"switched per request: {(other + ['backbone.' + k for k in not_lora])[:5]}")
        policy = self.policy
        with self._lock:
            add_named_adapter(policy.backbone, name, lora_cfg)
            try:
                renamed = rename_adapter_keys(lora_w, name)
                _, unexpected = policy.backbone.load_state_dict(renamed, strict=False)
                expected = {k for k in policy.backbone.state_dict() if "lora_" in k and f".{name}." in k}
                missing = sorted(expected - set(renamed))
                if unexpected or missing:
                    raise RuntimeError(f"adapter {path}: unexpected LoRA keys {sorted(unexpected)[:5]}, "
                                       f"missing LoRA keys {missing[:5]}")
                # A copy of the base head (same architecture and assets, e.g. a fitted tokenizer) that takes
                # the adapter's trained weights. The memo keeps a head's reference to the backbone shared.
                head = copy.deepcopy(self._entries[BASE].head, memo={id(policy.backbone): policy.backbone})
                params = {n for n, _ in head.named_parameters()}
                missing_h, unexpected_h = head.load_state_dict(head_w, strict=False)
                missing_h = sorted(set(missing_h) & params)  # buffers (not trained) keep the base's values
                if missing_h or unexpected_h:
                    raise RuntimeError(f"adapter {path}: head keys missing {missing_h[:5]}, "
                                       f"unexpected {sorted(unexpected_h)[:5]}")
            except Exception:
                from peft.tuners.tuners_utils import BaseTunerLayer

                for m in policy.backbone.modules():  # leave no half-registered adapter behind
                    if isinstance(m, BaseTunerLayer) and name in m.lora_A:
                        m.delete_adapter(name)
                raise
            finally:
                # Injection activates the new adapter; keep serving whatever was active before.
                set_active_adapter(policy.backbone, self._entries[self._active].lora)
            pre = self._entries[BASE].preprocessor
            if (path / PREPROCESSOR_NAME).exists():
                from vla.data.processor import Preprocessor

                pre = Preprocessor.from_state_dict(json.loads((path / PREPROCESSOR_NAME).read_text()),
                                                   policy.config, policy.backbone.tokenize)
            device = next(policy.parameters()).device
            policy.to(device).eval()
            self._entries[name] = _Entry(name, path, head.to(device).eval(), pre, name)

    # ----- serving ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def active(self) -> str:
        return self._active

    def check_name(self, name: str) -> str:
        """``name`` if registered, else `vla.registry.UnknownNameError` listing the known ones."""
        from vla.registry import lookup

        lookup("adapter", self._entries, name)
        return name

    def activate(self, name: str) -> Any:
        """Make ``name`` the active embodiment and return the policy (call under `lock`)."""
        entry = self._entries[self.check_name(name)]
        with self._lock:
            if name != self._active:
                from vla.lora import set_active_adapter

                set_active_adapter(self.policy.backbone, entry.lora)
                self.policy.head = entry.head
                self.policy.preprocessor = entry.preprocessor
                self._active = name
                self.switches += 1
            return self.policy

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def predict(self, name: str, raw_obs: Mapping[str, Any], **kwargs: Any) -> np.ndarray:
        """``policy.predict_action_chunk(raw_obs, **kwargs)`` with adapter ``name`` -> (H, A) numpy."""
        with self._lock:
            return self.activate(name).predict_action_chunk(raw_obs, **kwargs)

    def metadata(self, name: str) -> dict[str, Any]:
        """What a client needs to build observations for ``name``: cameras, dims, chunking."""
        e = self._entries[self.check_name(name)]
        cfg, pre = self.policy.config, e.preprocessor
        out: dict[str, Any] = {"chunk_size": int(cfg.chunk_size), "n_action_steps": int(cfg.n_action_steps),
                               "image_size": int(cfg.image_size), "path": None if e.path is None else str(e.path)}
        if pre is not None:
            out.update(cameras=sorted(pre.camera_map), state_dim=int(pre.state_dim), action_dim=int(pre.action_dim))
        return out
