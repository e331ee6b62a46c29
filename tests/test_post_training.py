"""DPO (exact and Diffusion-DPO), rewards, and the preference builder -> DPO pipeline end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from post_training.dpo_loss import dpo_objective, dpo_terms, frozen_reference, likelihood_kind, pair_losses
from post_training.rewards import action_deviation, combine, parse_weights, within_scale
from tests.helpers import backbone_variants, fit_head, head_variants, random_observation, tiny_policy_config
from vla.policy import VLAPolicy

HEADS = head_variants()


def _policy(head_name: str) -> VLAPolicy:
    torch.manual_seed(0)
    policy = VLAPolicy(tiny_policy_config(backbone_variants()["timm_lm"], HEADS[head_name])).eval()
    fit_head(policy)
    return policy


def _pair(policy, b: int = 3, seed: int = 0):
    """Chunks the head can represent: decoded samples for token heads, random ones for flow heads."""
    cfg = policy.config
    obs = random_observation(policy, batch=b, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if likelihood_kind(policy.head) == "exact":
        s = policy.sample_actions(obs, num_samples=2, generator=g)
        return obs, s[:, 0].clone(), s[:, 1].clone()
    return obs, torch.randn(b, cfg.chunk_size, cfg.max_action_dim, generator=g), \
        torch.randn(b, cfg.chunk_size, cfg.max_action_dim, generator=g)


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_dpo_loss_is_log2_when_policy_equals_reference(head_name: str) -> None:
    policy = _policy(head_name)
    ref = frozen_reference(policy.head)
    obs, w, l = _pair(policy)
    out = dpo_terms(policy.head, ref, policy.backbone, policy.encode(obs), w, l, beta=50.0,
                    generator=torch.Generator().manual_seed(3))
    assert math.isclose(float(out.loss.detach()), math.log(2), abs_tol=1e-6)
    assert torch.all(out.logits == 0)
    assert not any(p.requires_grad for p in ref.parameters())


def test_dpo_gradient_pushes_chosen_up_and_rejected_down() -> None:
    """At policy == reference (loss log 2), dL/d(-log pi(w)) > 0 and dL/d(-log pi(l)) < 0: a descent
    step raises the chosen chunk's likelihood and lowers the rejected one's, with weight beta/2."""
    pw = torch.tensor([1.3, 0.2], requires_grad=True)
    pl = torch.tensor([0.7, 2.0], requires_grad=True)
    loss, logits = dpo_objective(pw, pl, pw.detach().clone(), pl.detach().clone(), beta=4.0)
    assert torch.allclose(loss, torch.full((2,), math.log(2))) and torch.all(logits == 0)
    loss.sum().backward()
    assert torch.allclose(pw.grad, torch.full((2,), 2.0)) and torch.allclose(pl.grad, torch.full((2,), -2.0))


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_dpo_training_ranks_the_toy_pair(head_name: str) -> None:
    policy = _policy(head_name)
    ref = frozen_reference(policy.head)
    policy.backbone.requires_grad_(False)
    obs, w, l = _pair(policy, b=2)
    prefix = policy.encode(obs)
    opt = torch.optim.Adam(policy.head.parameters(), lr=1e-3)
    policy.head.train()
    for step in range(10):
        out = dpo_terms(policy.head, ref, policy.backbone, prefix, w, l, beta=5.0,
                        generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    policy.head.eval()
    # On fresh noise/time (flow), averaged over draws: the chosen chunk gained likelihood relative to the
    # rejected one (log pi/ref margin > 0), so the DPO loss is below its starting value log 2.
    outs = [dpo_terms(policy.head, ref, policy.backbone, prefix, w, l, beta=5.0,
                      generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]
    margin = torch.stack([o.chosen_ratio - o.rejected_ratio for o in outs]).mean(0)
    assert (margin > 0).all(), margin
    assert sum(float(o.loss.detach()) for o in outs) / len(outs) < math.log(2)


def test_flow_chosen_and_rejected_share_noise_and_time() -> None:
    """Identical chunks get identical flow errors only if both see the same noise and time."""
    policy = _policy("flow_matching")
    obs, w, _ = _pair(policy, b=4)
    prefix = policy.encode(obs)
    seen = []
    real_loss = policy.head.loss

    def spy(fn):
        def wrapped(*args, **kw):
            seen.append((kw["noise"].clone(), kw["time"].clone()))
            return fn(*args, **kw)
        return wrapped

    assert likelihood_kind(policy.head) == "flow"
    ref = frozen_reference(policy.head)
    policy.head.loss = spy(real_loss)
    ref.loss = spy(ref.loss)
    out = dpo_terms(policy.head, ref, policy.backbone, prefix, w, w.clone(), beta=1.0, kind="flow",
                    generator=torch.Generator().manual_seed(0))
    assert torch.all(out.logits == 0)
    is_pad = torch.zeros(4, policy.config.chunk_size, dtype=torch.bool)
    noise = torch.randn(4, policy.config.chunk_size, policy.config.max_action_dim)
    time = torch.rand(4)
    a, b = pair_losses(policy.head, policy.backbone, prefix, w, w.clone(), is_pad, "flow", noise, time)
    assert torch.equal(a, b)  # bitwise: same chunk, same corruption
    # Every call saw pair members (rows 2i, 2i+1) with the same noise and time, and the reference the
    # same corruption as the policy.
    assert len(seen) == 3
    for nz, t in seen:
        assert torch.equal(nz[0::2], nz[1::2]) and torch.equal(t[0::2], t[1::2])
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    # Independent corruption would have given different errors for the identical chunks.
    c = real_loss(policy.backbone, prefix, w, is_pad).mean(-1)
    d = real_loss(policy.backbone, prefix, w, is_pad).mean(-1)
    assert not torch.allclose(c, d)


def test_dpo_rejects_bad_input() -> None:
    policy = _policy("flow_matching")
    ref = frozen_reference(policy.head)
    obs, w, l = _pair(policy)
    with pytest.raises(ValueError, match="beta"):
        dpo_terms(policy.head, ref, policy.backbone, policy.encode(obs), w, l, beta=0.0)
    with pytest.raises(ValueError, match="chosen and rejected"):
        dpo_terms(policy.head, ref, policy.backbone, policy.encode(obs), w, l[:, :-1], beta=1.0)


def test_rewards() -> None:
    ref = torch.zeros(2, 4, 3)
    chunks = torch.zeros(2, 3, 4, 3)
    chunks[:, 1] = 1.0  # every step off by (1, 1, 1): L2 distance sqrt(3)
    chunks[:, 2, :, 2] = 5.0  # off only in the padded action dim
    dim_mask = torch.tensor([[True, True, False]] * 2)
    is_pad = torch.tensor([[False, False, False, True]] * 2)
    chunks[:, 0, 3] = 9.0  # only on a padded step
    dev = action_deviation(chunks, ref, is_pad, dim_mask)
    assert torch.allclose(dev, torch.tensor([[0.0, math.sqrt(2), 0.0]] * 2))
    comps = {"goal_progress": torch.tensor([[1.0, 3.0]]), "action": torch.tensor([[-2.0, -2.0]])}
    assert within_scale(comps["goal_progress"]) == pytest.approx(1.0)
    assert torch.allclose(combine(comps, {"goal_progress": 2.0, "action": 1.0}, {"goal_progress": 1.0, "action": 1.0}),
                          torch.tensor([[0.0, 4.0]]))
    assert parse_weights("goal_progress=1,action=0.5") == {"goal_progress": 1.0, "action": 0.5}
    with pytest.raises(ValueError, match="goal_progress"):
        parse_weights("progress=1")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Synthetic dataset -> tiny policy -> world model -> preference set (the CLIs' main functions)."""
    from post_training import preferences, world_model_train
    from vla.config import TrainConfig, parse_config
    from vla.data.synthetic import make_synthetic_dataset
    from vla.presets import get_preset
    from vla.train import train

    tmp = tmp_path_factory.mktemp("pt")
    data = make_synthetic_dataset(tmp / "data", num_episodes=4, episode_len=12)
    policy = train(parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp / 'run'}", f"--dataset.root={data}", "--dataset.synthetic=false", "--batch_size=4",
        "--steps=2", "--save_every=0", "--warmup_steps=1"]))
    assert world_model_train.main(["--dataset", str(data), "--policy", str(policy), "--output_dir",
                                   str(tmp / "wm"), "--steps", "5", "--width", "32", "--num_layers", "1",
                                   "--val_every", "2", "--eval_every", "5", "--save_every", "0"]) == 0
    wm = tmp / "wm" / "checkpoints" / "last" / "world_model"
    prefs = tmp / "prefs"
    assert preferences.main(["--dataset", str(data), "--policy", str(policy), "--world_model", str(wm),
                             "--out", str(prefs), "--num_obs", "10", "--samples", "4", "--min_margin", "0.1",
                             "--batch_size", "4"]) == 0
    return {"data": data, "policy": policy, "prefs": prefs, "tmp": tmp}


def test_preference_set_reloads(pipeline) -> None:
    from post_training.preferences import PreferenceSet

    ps = PreferenceSet.load(pipeline["prefs"])
    policy = VLAPolicy.from_pretrained(pipeline["policy"])
    h, a = policy.config.chunk_size, policy.config.max_action_dim
    assert ps.candidates.shape == (10, 4, h, a) and ps.scores.shape == (10, 4)
    assert set(ps.components) == {"goal_progress", "action"}
    rows = torch.arange(10)
    margin = ps.scores[rows, ps.chosen_id] - ps.scores[rows, ps.rejected_id]
    assert (margin >= 0).all() and torch.equal(ps.kept, margin >= 0.1)
    idx, w, l = ps.pairs()
    assert len(idx) == int(ps.kept.sum()) > 0 and w.shape == l.shape == (len(idx), h, a)
    assert not torch.equal(w, l)
    assert ps.meta["samples"] == 4 and ps.meta["kept"] == len(idx)
    # The stored action component is minus the deviation from the dataset's own chunk at that frame.
    assert (ps.components["action"] <= 0).all()
    with pytest.raises(FileNotFoundError, match="pairs.pt"):
        PreferenceSet.load(pipeline["tmp"])


@pytest.mark.parametrize("mode", ["full", "lora", "head"])
def test_dpo_cli_trains_and_reloads(pipeline, mode: str, tmp_path: Path) -> None:
    import json

    from post_training import dpo

    out = tmp_path / mode
    assert dpo.main(["--policy", str(pipeline["policy"]), "--preferences", str(pipeline["prefs"]),
                     "--output_dir", str(out), "--train", mode, "--steps", "3", "--batch_size", "4",
                     "--lr", "1e-3", "--log_every", "1", "--val_fraction", "0.3", "--beta", "10"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["val_accuracy"] is not None
    assert log[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # first step: policy == reference
    assert "val_accuracy" in log[-1]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    trained = VLAPolicy.from_pretrained(ckpt)
    base = VLAPolicy.from_pretrained(pipeline["policy"])
    changed = [n for n, p in trained.head.state_dict().items() if not torch.equal(p, base.head.state_dict()[n])]
    assert changed, "DPO did not change the head"
    bb_changed = [n for n, p in trained.backbone.state_dict().items()
                  if n in base.backbone.state_dict() and not torch.equal(p, base.backbone.state_dict()[n])]
    if mode == "head":
        assert not bb_changed
    if mode == "lora":
        assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    with pytest.raises(ValueError, match="--train"):
        dpo.main(["--policy", str(pipeline["policy"]), "--preferences", str(pipeline["prefs"]),
                  "--output_dir", str(tmp_path / "bad"), "--train", "everything"])


def _restore_check(job: dict) -> dict:
    """In a simulator worker: a chunk rolled from a restored state repeats the live rollout exactly."""
    import numpy as np

    from benchmarks.metaworld.chunk_outcome import chunk_outcomes, restore, roll_chunk, snapshot
    from benchmarks.metaworld.tasks import variations
    from benchmarks.metaworld.workers import get_env

    env = get_env(job["task"], ("corner2",), 64)
    env.set_variation(variations(job["task"], "eval", 1, 0)[0][2])
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.step(rng.uniform(-1, 1, 4))
    chunks = rng.uniform(-1, 1, (3, 8, 4))
    before = env.env._get_obs().copy()
    snap = snapshot(env)
    live = roll_chunk(env, chunks[1])  # from the true state, never restored
    after_live = env.env._get_obs().copy()
    restore(env, snap)
    restored_obs = env.env._get_obs().copy()
    again = roll_chunk(env, chunks[1])
    after_again = env.env._get_obs().copy()
    restore(env, snap)
    outs = chunk_outcomes(env, chunks)
    return {"live": live, "again": again, "outs": outs, "obs_equal": bool(np.array_equal(before, restored_obs)),
            "after_equal": bool(np.array_equal(after_live, after_again)),
            "state_kept": bool(np.array_equal(before, env.env._get_obs())), "path": int(env.env.curr_path_length)}


@pytest.mark.sim
@pytest.mark.timeout(240)
def test_simulator_chunk_outcome_restores_state_exactly() -> None:
    pytest.importorskip("metaworld")
    from benchmarks.metaworld.workers import run_jobs

    (r,) = list(run_jobs(_restore_check, [{"task": "push-v3"}], workers=1, progress=False))
    assert r["obs_equal"] and r["after_equal"] and r["state_kept"]
    assert r["live"] == r["again"]  # rewards, success and steps bit for bit
    assert r["outs"][1] == r["live"] and r["path"] == 5
    assert len({o["return"] for o in r["outs"]}) == 3  # different chunks, different outcomes


def test_grpo_group_advantages_and_update_direction() -> None:
    from post_training.grpo import group_advantages, grpo_terms

    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5) and torch.all(adv[1] == 0)
    for head_name in sorted(HEADS):
        policy = _policy(head_name)
        ref = frozen_reference(policy.head)
        policy.backbone.requires_grad_(False)
        obs, w, l = _pair(policy, b=2)
        chunks = torch.stack([w, l], 1)  # (B, 2, H, A): the first has the higher reward
        adv = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
        prefix = policy.encode(obs)
        opt = torch.optim.Adam(policy.head.parameters(), lr=1e-3)
        for step in range(10):
            loss, _ = grpo_terms(policy.head, ref, policy.backbone, prefix, chunks, adv, kl_weight=0.1,
                                 generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        outs = [dpo_terms(policy.head, ref, policy.backbone, prefix, w, l, beta=1.0,
                          generator=torch.Generator().manual_seed(50 + i)) for i in range(8)]
        margin = torch.stack([o.chosen_ratio - o.rejected_ratio for o in outs]).mean(0)
        assert (margin > 0).all(), (head_name, margin)


def test_grpo_cli_runs(pipeline, tmp_path: Path) -> None:
    from post_training import grpo

    wm = pipeline["tmp"] / "wm" / "checkpoints" / "last" / "world_model"
    assert grpo.main(["--policy", str(pipeline["policy"]), "--world_model", str(wm), "--dataset",
                      str(pipeline["data"]), "--output_dir", str(tmp_path / "g"), "--steps", "2",
                      "--batch_size", "2", "--group", "3", "--weights", "goal_progress=1,action=1"]) == 0
    assert VLAPolicy.from_pretrained(tmp_path / "g" / "checkpoints" / "last" / "pretrained_model") is not None
