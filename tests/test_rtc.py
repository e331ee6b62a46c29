"""Real-time chunking: RTC's soft mask, and guidance that makes a new chunk agree with committed actions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from policies.flow_matching import FlowMatchingConfig
from policies.rtc import InpaintGuide, guidance_scale, rtc_weights
from tests.helpers import random_observation, tiny_checkpoint, tiny_policy_config
from vla.backbones.timm_lm import TimmLMConfig
from vla.policy import VLAPolicy


def test_rtc_weights_freeze_decay_and_free() -> None:
    w = rtc_weights(horizon=10, delay=2, execute=3)
    assert w[:2].tolist() == [1.0, 1.0] and w[7:].tolist() == [0.0, 0.0, 0.0]
    assert (np.diff(w[2:8]) < 0).all() and (0 < w[2:7]).all() and (w[2:7] < 1).all()
    assert rtc_weights(8, 0, 8).sum() == 0.0  # nothing committed: plain sampling
    with pytest.raises(ValueError, match="execute must be in"):
        rtc_weights(8, 4, 5)
    # The guidance scale is capped by max_guidance at the noisy start and never negative.
    assert guidance_scale(1.0, 5.0) == 5.0 and 0 < guidance_scale(0.5, 5.0) <= 5.0


def _policy() -> VLAPolicy:
    torch.manual_seed(0)
    bb = TimmLMConfig(pretrained_vision=False, width=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return VLAPolicy(tiny_policy_config(bb, FlowMatchingConfig(width=48, num_steps=10), chunk_size=6)).eval()


def test_guidance_pulls_the_weighted_steps_to_the_committed_actions() -> None:
    policy = _policy()
    obs = random_observation(policy, batch=2)
    prefix = policy.encode(obs)
    h, a = policy.config.chunk_size, policy.config.max_action_dim
    noise = torch.randn(2 * 3, h, a, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, h, a, generator=torch.Generator().manual_seed(2))
    weights = torch.zeros(2, h, a)
    weights[:, :3] = 1.0  # three committed steps, the rest free
    free = policy.head.sample(policy.backbone, prefix, num_samples=3, noise=noise)
    guided = policy.head.sample(policy.backbone, prefix, num_samples=3, noise=noise,
                                guide=InpaintGuide(target, weights))
    err = lambda c: (c[:, :, :3] - target[:, None, :3]).abs().mean().item()  # noqa: E731
    assert err(guided) < 0.25 * err(free), (err(guided), err(free))
    assert torch.isfinite(guided).all()
    with pytest.raises(ValueError, match=r"inpaint target: expected shape \(B, H, A\)"):
        policy.head.sample(policy.backbone, prefix, guide=InpaintGuide(target[:, :2], weights))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("rtc"))[0]


def test_predict_action_chunk_inpaints_in_raw_units(checkpoint: Path) -> None:
    policy = VLAPolicy.from_pretrained(checkpoint)
    pre = policy.preprocessor
    raw = {k: (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8) for k in pre.camera_map}
    raw["observation.state"] = np.zeros(pre.state_dim, np.float32)
    raw["task"] = "push the red block"
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    free = policy.predict_action_chunk(raw, generator=g())
    committed = free[:3] + 0.5  # the robot is executing something else than this chunk would
    guided = policy.predict_action_chunk(raw, generator=g(), inpaint=committed,
                                         inpaint_weights=rtc_weights(3, 3, 0))
    assert guided.shape == free.shape and np.isfinite(guided).all()
    assert np.abs(guided[:3] - committed).mean() < 0.3 * np.abs(free[:3] - committed).mean()
    with pytest.raises(ValueError, match="inpaint: expected"):
        policy.predict_action_chunk(raw, inpaint=np.zeros((policy.config.chunk_size + 1, pre.action_dim)))
    with pytest.raises(ValueError, match="inpaint_weights: expected shape"):
        policy.predict_action_chunk(raw, inpaint=committed, inpaint_weights=np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action_chunk(raw, inpaint=np.full_like(committed, np.nan))
