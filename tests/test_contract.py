"""Every registered backbone x every registered head passes the same contract test.

Parametrized over the registries, so a new backbone or head is tested the day it is registered.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import backbone_variants, fit_head, head_variants, random_observation, tiny_policy_config
from vla.policy import VLAPolicy

BACKBONES = backbone_variants()
HEADS = head_variants()


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone_id(request):
    return request.param


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_head_contract(backbone_id: str, head_name: str) -> None:
    torch.manual_seed(0)
    policy = VLAPolicy(tiny_policy_config(BACKBONES[backbone_id], HEADS[head_name]))
    fit_head(policy)
    cfg = policy.config
    b, h, a = 2, cfg.chunk_size, cfg.max_action_dim
    obs = random_observation(policy, batch=b)
    actions = torch.randn(b, h, a)
    is_pad = torch.zeros(b, h, dtype=torch.bool)
    is_pad[1, -1] = True  # the last step of item 1 is padding
    dim_mask = torch.ones(b, a, dtype=torch.bool)
    dim_mask[:, -1] = False  # the last action dim is padding

    per_step = policy.loss(obs, actions, is_pad, dim_mask)
    assert per_step.shape == (b, h)
    assert torch.isfinite(per_step).all()
    assert per_step[1, -1] == 0, "padded steps must contribute exactly zero"
    assert (per_step[~is_pad] > 0).all()

    per_step.sum().backward()
    head_params = [(n, p) for n, p in policy.head.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in head_params if p.grad is None or not torch.any(p.grad != 0)]
    assert not no_grad, f"head parameters without gradient: {no_grad}"
    bb = [(n, p) for n, p in policy.backbone.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in bb if p.grad is not None and torch.any(p.grad != 0)]
    assert len(with_grad) >= 0.8 * len(bb), (
        f"only {len(with_grad)}/{len(bb)} backbone tensors got gradient; missing e.g. "
        f"{[n for n, _ in bb if n not in with_grad][:8]}")

    policy.eval()
    passes = policy.backbone.prefix_passes
    chunks = policy.sample_actions(obs, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert chunks.shape == (b, 3, h, a)
    assert torch.isfinite(chunks).all()
    assert policy.backbone.prefix_passes == passes + 1, "N candidates must share one backbone pass"
    # Candidates differ (they come from different noise / samples).
    assert not torch.allclose(chunks[:, 0], chunks[:, 1])


def test_registries_are_not_empty() -> None:
    assert "timm_lm" in {k.split(":")[0] for k in BACKBONES}
    assert "flow_matching" in HEADS


def test_save_reload_gives_identical_chunks(backbone_id: str, tmp_path) -> None:
    """Every backbone round-trips through save_pretrained/from_pretrained without its original source
    (assets are saved into the checkpoint; tied weights stored once)."""
    head = HEADS["flow_matching"]
    policy = VLAPolicy(tiny_policy_config(BACKBONES[backbone_id], head)).eval()
    obs = random_observation(policy, batch=2)
    before = policy.sample_actions(obs, num_samples=2, generator=torch.Generator().manual_seed(0))
    policy.save_pretrained(tmp_path / "ckpt")
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    after = again.sample_actions(obs, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(before, after, atol=1e-6)


def test_fresh_timm_backbone_keeps_batchnorm_statistics() -> None:
    """A forward pass straight after construction must not update the encoder's running statistics."""
    from vla.backbones.timm_lm import TimmLMConfig

    backbone = TimmLMConfig.tiny_variants()[next(iter(TimmLMConfig.tiny_variants()))].build()
    bns = [m for m in backbone.vision.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns, "the tiny timm encoder has BatchNorm layers"
    assert all(not m.training for m in bns)


def test_from_pretrained_overrides_execution_settings(tmp_path, caplog) -> None:
    """``overrides`` change execution settings of a saved policy without retraining; a field the config
    does not have is an error that names it."""
    backbone = next(v for k, v in BACKBONES.items() if k.startswith("timm_lm"))
    policy = VLAPolicy(tiny_policy_config(backbone, HEADS["flow_matching"])).eval()
    policy.save_pretrained(tmp_path / "ckpt")
    steps = policy.config.head.num_steps
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt", overrides=[f"--head.num_steps={steps + 2}", "--n_action_steps=1"])
    assert again.config.head.num_steps == steps + 2 and again.config.n_action_steps == 1
    assert VLAPolicy.from_pretrained(tmp_path / "ckpt").config.head.num_steps == steps  # the file is untouched
    with pytest.raises(Exception, match="bogus"):
        VLAPolicy.from_pretrained(tmp_path / "ckpt", overrides=["--head.bogus=1"])
    from benchmarks.metaworld.evaluate import evaluate, main

    with pytest.raises(Exception, match="bogus"):  # checked once, before any worker starts
        evaluate(str(tmp_path / "ckpt"), ["reach"], episodes_per_task=1, workers=1, progress=False,
                 policy_overrides=["--head.bogus=1"])
    with pytest.raises(SystemExit):  # only --policy.FIELD=VALUE may follow the known flags
        main(["--policy", str(tmp_path / "ckpt"), "--head.num_steps=2"])
    with pytest.raises(ValueError, match="does not parse"):
        VLAPolicy.from_pretrained(tmp_path / "ckpt", overrides=["--head.num_steps=many"])
    with pytest.raises(ValueError, match=r"head.num_steps: expected an int >= 1"):  # noise must not reach a robot
        VLAPolicy.from_pretrained(tmp_path / "ckpt", overrides=["--head.num_steps=0"])
    import logging

    with caplog.at_level(logging.WARNING):  # allowed, but the weights were trained with the saved value
        VLAPolicy.from_pretrained(tmp_path / "ckpt", overrides=["--head.max_period=8.0"])
    assert "not an execution setting" in caplog.text
    with pytest.raises(ValueError, match="does not parse"):
        evaluate(str(tmp_path / "ckpt"), ["reach"], episodes_per_task=1, workers=1, progress=False,
                 policy_overrides=["--head.num_steps=many"])
    with pytest.raises(SystemExit):
        main(["--policy", "expert", "--policy.head.num_steps=2"])
    from robots.server import main as serve_main

    with pytest.raises(SystemExit):  # vla serve: the same rule, before anything is loaded
        serve_main(["--policy", str(tmp_path / "ckpt"), "--temperature=0"])
