"""Shared builders for tests: tiny policies and random observations."""
from __future__ import annotations


from vla.config import BackboneConfig, HeadConfig, PolicyConfig
from vla.plugins import load_plugins
from vla.registry import choice_names
from vla.testing import random_observation  # noqa: F401  (re-exported for tests)


def backbone_variants() -> dict[str, BackboneConfig]:
    """Every tiny variant of every registered backbone, by id (e.g. "hf_vlm:smolvlm")."""
    load_plugins()
    out = {}
    for name in choice_names(BackboneConfig):
        out.update(BackboneConfig.get_choice_class(name).tiny_variants())
    return out


def head_variants() -> dict[str, HeadConfig]:
    load_plugins()
    return {name: HeadConfig.get_choice_class(name).tiny() for name in choice_names(HeadConfig)}


def tiny_policy_config(backbone: BackboneConfig, head: HeadConfig, **kw) -> PolicyConfig:
    base = dict(chunk_size=4, n_action_steps=2, max_state_dim=5, max_action_dim=3,
                cameras=["cam0", "cam1"], image_size=32, max_prompt_len=24)
    base.update(kw)
    return PolicyConfig(backbone=backbone, head=head, **base)


def fit_head(policy, num: int = 64, seed: int = 0) -> None:
    """Token heads need a fitted action tokenizer: fit it on random normalized chunks (no-op otherwise)."""
    import numpy as np

    if hasattr(policy.head, "fit_tokenizer"):
        cfg = policy.config
        rng = np.random.default_rng(seed)
        policy.head.fit_tokenizer(rng.standard_normal((num, cfg.chunk_size, cfg.max_action_dim)))
