"""Flow-matching head: the cached-prefix path equals one joint block-causal pass (pi0's mixture of
transformers), sampling reuses the prefix, and time/noise handling is what pi0 does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from policies.flow_matching import FlowMatchingConfig
from tests.helpers import random_observation, tiny_policy_config
from vla.backbones.timm_lm import TimmLMConfig
from vla.nn import attend, attend_shared_prefix, rope, rope_table, sincos_embedding
from vla.policy import VLAPolicy


def _policy(**kw) -> VLAPolicy:
    torch.manual_seed(0)
    bb = TimmLMConfig(pretrained_vision=False, width=64, num_layers=3, num_heads=4, num_kv_heads=2)
    return VLAPolicy(tiny_policy_config(bb, FlowMatchingConfig(width=48, num_steps=4), **kw)).double()


def _block_causal_mask(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """pi0's make_att_2d_masks: token i may attend to j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are
    real tokens. ar marks the first token of each new causal block."""
    cum = torch.cumsum(ar.long(), dim=1)
    att = cum[:, None, :] <= cum[:, :, None]
    valid = pad[:, None, :] & pad[:, :, None]
    eye = torch.eye(pad.shape[1], dtype=torch.bool)[None]
    return (att & valid) | eye  # a padded query sees only itself (its output is never used)


def _joint_velocity(policy: VLAPolicy, obs, x_t, t) -> torch.Tensor:
    """Reference: ONE pass over [prefix | state | actions] with the full block-causal mask, the
    backbone's layers on the prefix tokens and the expert's layers on the suffix tokens."""
    bb, head = policy.backbone, policy.head
    xp, valid, pos_p = bb.embed_prefix(obs)
    b, tp = valid.shape
    h = x_t.shape[1]
    xs = torch.cat([head.state_in(obs.state)[:, None], head.embed_actions(x_t, t)], dim=1)
    pos_s = valid.sum(-1)[:, None] + torch.arange(1 + h)[None]
    pad = torch.cat([valid, torch.ones(b, 1 + h, dtype=torch.bool)], dim=1)
    ar = torch.zeros(b, tp + 1 + h, dtype=torch.bool)
    ar[:, tp] = True  # state starts a block
    ar[:, tp + 1] = True  # actions start a block
    mask = _block_causal_mask(pad, ar)
    for blk_p, blk_s in zip(bb.blocks, head.blocks):
        qp, kp, vp = blk_p.qkv(xp, pos_p)
        qs, ks, vs = blk_s.qkv(xs, pos_s)
        out = attend(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), mask)
        xp = blk_p.finish(xp, out[:, :, :tp])
        xs = blk_s.finish(xs, out[:, :, tp:])
    return head.action_out(head.norm(xs))[:, 1:]


def test_cached_prefix_equals_joint_block_causal_pass() -> None:
    policy = _policy()
    obs = random_observation(policy, batch=3, prompts=["a", "open the drawer", "push it left now"])
    obs.image_masks["cam1"][1] = False  # a missing camera: its tokens are padding
    obs = _double(obs)
    x_t = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    prefix = policy.encode(obs)
    cached = policy.head.velocity(policy.head.with_state(prefix), x_t, t)
    joint = _joint_velocity(policy, obs, x_t, t)
    assert torch.allclose(cached, joint, atol=1e-5), (cached - joint).abs().max()

    # The training loss through the cache equals the loss computed from the joint pass.
    actions = torch.randn_like(x_t)
    noise = torch.randn_like(x_t)
    is_pad = torch.zeros(3, x_t.shape[1], dtype=torch.bool)
    loss = policy.head.loss(policy.backbone, prefix, actions, is_pad, noise=noise, time=t)
    tt = t[:, None, None]
    v = _joint_velocity(policy, obs, tt * noise + (1 - tt) * actions, t)
    ref = (v - (noise - actions)).pow(2).mean(-1)
    assert torch.allclose(loss, ref, atol=1e-5)


def test_block_causal_structure_matters() -> None:
    """Guard against a vacuous equivalence: letting the state see the actions changes the result."""
    policy = _policy()
    obs = _double(random_observation(policy, batch=2))
    x_t = torch.randn(2, policy.config.chunk_size, policy.config.max_action_dim, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    ctx = policy.head.with_state(policy.encode(obs))
    v1 = policy.head.velocity(ctx, x_t, t)
    x_t2 = x_t.clone()
    x_t2[:, -1] += 1.0  # changing the last action changes the other actions' velocity (bidirectional block)
    v2 = policy.head.velocity(ctx, x_t2, t)
    assert not torch.allclose(v1[:, 0], v2[:, 0])


def test_repeat_does_not_rerun_backbone() -> None:
    policy = _policy().float().eval()
    obs = random_observation(policy, batch=2)
    calls = []
    policy.backbone.vision.conv_stem.register_forward_hook(lambda *a: calls.append(1))
    prefix = policy.encode(obs)
    assert len(calls) == 1
    rep = prefix.repeat(5)
    assert len(calls) == 1 and rep.batch_size == 10
    assert torch.equal(rep.kv[0][0][5], prefix.kv[0][0][1])  # sample-major layout
    chunks = policy.head.sample(policy.backbone, prefix, num_samples=16)
    assert len(calls) == 1 and chunks.shape[:2] == (2, 16)


def test_sampling_is_seeded_and_repeat_consistent() -> None:
    policy = _policy().float().eval()
    obs = random_observation(policy, batch=2)
    a = policy.sample_actions(obs, num_samples=4, generator=torch.Generator().manual_seed(3))
    b = policy.sample_actions(obs, num_samples=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # Candidate k of a batch equals sampling that item alone with the same noise.
    noise = torch.randn(2 * 4, policy.config.chunk_size, policy.config.max_action_dim)
    full = policy.head.sample(policy.backbone, policy.encode(obs), num_samples=4, noise=noise)
    one = policy.head.sample(policy.backbone, policy.encode(_take(obs, 1)), num_samples=4, noise=noise[4:])
    assert torch.allclose(full[1], one[0], atol=1e-5)


def test_rope_rotates_pairs_by_position_times_frequency() -> None:
    """RoPE (rotate-half layout) against a complex-number reference: dims i and i + D/2 form the pair
    rotated by angle pos * theta^(-2i/D); a precomputed table gives the same result as positions."""
    torch.manual_seed(0)
    b, h, t, d, theta = 2, 3, 5, 8, 100.0
    x = torch.randn(b, h, t, d, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 7, 9], [3, 3, 4, 5, 100]])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones((), dtype=torch.float64), pos[:, None, :, None] * freq)
    ref = torch.cat([z.real, z.imag], -1)
    assert torch.allclose(rope(x, pos, theta), ref, atol=1e-6)  # tables are fp32
    table = rope_table(pos, d, theta)
    assert torch.equal(rope(x, table, theta), rope(x, pos, theta))


def test_shared_prefix_attention_equals_repeated_prefix() -> None:
    """Cascade attention over one un-repeated prefix == plain attention over the prefix repeated N times."""
    torch.manual_seed(0)
    b, n, h, kvh, t, p, d = 2, 3, 4, 2, 5, 7, 8
    q = torch.randn(b * n, h, t, d, dtype=torch.float64)  # candidate-major rows, as the reference reads them
    pk, pv = torch.randn(2, b, kvh, p, d, dtype=torch.float64)
    k, v = torch.randn(2, b * n, kvh, t, d, dtype=torch.float64)
    pmask = torch.ones(b, p, dtype=torch.bool)
    pmask[1, 4:] = False  # padded prefix tokens of the second observation
    self_mask = torch.ones(t, t, dtype=torch.bool).tril()  # not symmetric: catches a transposed layout
    # attend_shared_prefix reads the N candidates of a row end to end: (B, heads, N*T, D).
    joined = lambda x: x.view(b, n, *x.shape[1:]).transpose(1, 2).reshape(b, x.shape[1], n * t, d)  # noqa: E731
    split = lambda x: x.view(b, h, n, t, d).transpose(1, 2).reshape(b * n, h, t, d)  # noqa: E731
    got = split(attend_shared_prefix(joined(q), pk, pv, pmask, joined(k), joined(v), n, self_mask))
    rep = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731
    mask = torch.cat([rep(pmask)[:, None].expand(-1, t, -1), self_mask[None].expand(b * n, t, t)], dim=2)
    ref = attend(q, torch.cat([rep(pk), k], 2), torch.cat([rep(pv), v], 2), mask)
    assert torch.allclose(got, ref, atol=1e-10), (got - ref).abs().max()
    full = torch.cat([rep(pmask)[:, None].expand(-1, t, -1), torch.ones(b * n, t, t, dtype=torch.bool)], dim=2)
    ref_full = attend(q, torch.cat([rep(pk), k], 2), torch.cat([rep(pv), v], 2), full)
    got_full = split(attend_shared_prefix(joined(q), pk, pv, pmask, joined(k), joined(v), n))  # no self mask
    assert torch.allclose(got_full, ref_full, atol=1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 inputs: fp32 softmax, bf16 result
        low = attend_shared_prefix(*(joined(x).bfloat16() for x in (q,)), pk.bfloat16(), pv.bfloat16(), pmask,
                                   joined(k).bfloat16(), joined(v).bfloat16(), n, self_mask)
    assert low.dtype == torch.bfloat16 and torch.allclose(split(low).double(), ref, atol=3e-2)


def test_candidates_on_a_shared_context_equal_a_repeated_context() -> None:
    """head.sample shares the context across N candidates (cascade attention on one copy); the result
    equals N copies of the context run one row each."""
    policy = _policy().float().eval()
    obs = random_observation(policy, batch=2)
    obs.image_masks["cam1"][1] = False  # a masked context token in one row only
    prefix = policy.encode(obs)
    noise = torch.randn(2 * 5, policy.config.chunk_size, policy.config.max_action_dim)
    shared = policy.head.sample(policy.backbone, prefix, num_samples=5, noise=noise)
    ctx = policy.head.with_state(prefix).repeat(5)  # the reference: N copies of the cache, one row each
    x = noise.clone()
    for i in range(policy.head.cfg.num_steps):
        t = torch.full((10,), 1.0 - i / policy.head.cfg.num_steps)
        x = x - policy.head.velocity(ctx, x, t) / policy.head.cfg.num_steps
    assert torch.allclose(shared, x.view(2, 5, *x.shape[1:]), atol=1e-5)
    assert policy.head.candidate_context(policy.head.with_state(prefix), 5).prefix_mask is not None


def test_time_distribution_is_beta_1p5_1() -> None:
    policy = _policy()
    t = policy.head.sample_time(200_000, "cpu")
    assert 0.001 <= t.min() and t.max() <= 1.0
    # Beta(1.5, 1) has mean 0.6; after the 0.999 squeeze: 0.6 * 0.999 + 0.001
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 3e-3
    g1 = policy.head.sample_time(5, "cpu", torch.Generator().manual_seed(0))
    g2 = policy.head.sample_time(5, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(g1, g2)


def test_euler_integration_recovers_a_known_flow() -> None:
    """With a velocity field that is exactly noise - a* (the optimum for a point mass at a*), Euler
    integration from t=1 lands on a* for any number of steps."""
    policy = _policy().float().eval()
    obs = random_observation(policy, batch=1)
    target = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim)
    noise = torch.randn_like(target)
    head = policy.head
    # v(x_t, t) = (x_t - a*) / t is the exact conditional velocity toward a*.
    head.velocity = lambda ctx, x, t, return_hidden=False, candidates=None: (
        ((x - target) / t[:, None, None]), torch.zeros(x.shape[0], x.shape[1], 1)) if return_hidden else (x - target) / t[:, None, None]
    out = head.sample(policy.backbone, policy.encode(obs), num_samples=1, noise=noise)
    assert torch.allclose(out[:, 0], target, atol=1e-5)


def _double(obs):
    from vla.types import Observation

    return Observation(images={k: v.double() for k, v in obs.images.items()}, image_masks=obs.image_masks,
                       state=obs.state.double(), prompt_ids=obs.prompt_ids, prompt_mask=obs.prompt_mask,
                       state_mask=obs.state_mask)


def _take(obs, i):
    from vla.types import Observation

    s = slice(i, i + 1)
    return Observation(images={k: v[s] for k, v in obs.images.items()},
                       image_masks={k: v[s] for k, v in obs.image_masks.items()}, state=obs.state[s],
                       prompt_ids=obs.prompt_ids[s], prompt_mask=obs.prompt_mask[s], state_mask=obs.state_mask[s])


def test_action_time_embedding_matches_pi0_concatenation() -> None:
    """embed_actions splits time_mlp_in instead of concatenating [action, time] per token; the weights keep
    pi0's layout (action half first), so checkpoints and the reference computation agree."""
    head = _policy().float().head
    x, t = torch.randn(3, head.chunk_size, head.action_dim), torch.rand(3)
    a = head.action_in(x)
    te = sincos_embedding(t, head.cfg.width, head.cfg.min_period, head.cfg.max_period)
    ref = head.time_mlp_out(F.silu(head.time_mlp_in(torch.cat([a, te[:, None].expand_as(a)], -1))))
    assert torch.allclose(head.embed_actions(x, t), ref, atol=1e-6)


def test_velocity_rejects_rows_that_are_not_whole_candidate_sets() -> None:
    policy = _policy().float().eval()
    ctx = policy.head.with_state(policy.encode(random_observation(policy, batch=2)))
    x = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    with pytest.raises(ValueError, match="3 action rows do not split into N >= 1 candidates"):
        policy.head.velocity(ctx, x, torch.rand(3))
