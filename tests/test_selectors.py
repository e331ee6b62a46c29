"""Test-time chunk selectors: the contract for every registered selector, the CFN's pseudo-count, one
backbone pass for N candidates, saving the CFN with a policy, `vla post-train cfn`, broker and errors."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from policies.broker import ChunkBroker
from policies.selectors import (
    ChunkSelector,
    CoinFlipNetwork,
    WorldModelSelector,
    fit_cfn,
    load_selector,
    make_selector,
    selector_names,
)
from policies.selectors.cfn import CfnSelector
from policies.selectors.dagger import DaggerSelector, dagger_inputs
from policies.selectors.gate import GatedSelector
from policies.selectors.value import ValueSelector, value_inputs
from post_training.dagger_train import fit_dagger
from post_training.value_train import fit_value
from vla.registry import UnknownNameError

B, N, H, A, W = 3, 6, 4, 3, 16
T, D, S = 5, 8, 2  # prefix tokens, backbone width, proprio dims of the fake observation


def _obs_prefix(b: int = B, seed: int = 2) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A fake normalized observation (state (b, S)) and prefix (hidden (b, T, D), the last token padded)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[:, -1] = False
    ids = torch.arange(b * 4).view(b, 4) % 7  # a different instruction per row (for the `gated` selector)
    obs = SimpleNamespace(batch_size=b, state=torch.randn(b, S, generator=g), prompt_ids=ids,
                          prompt_mask=torch.ones(b, 4, dtype=torch.bool))
    return obs, SimpleNamespace(hidden=torch.randn(b, T, D, generator=g), mask=mask, extras={})


def _low_rank_features(m: int, w: int = W, rank: int = 3, seed: int = 0) -> torch.Tensor:
    """(m, w) features on a rank-3 subspace: structured, like a head's hidden states."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, w, generator=g)
    return torch.randn(m, rank, generator=g) @ basis + 0.01 * torch.randn(m, w, generator=g)


class _RewardModel:
    """A world model stand-in with the post_training contract: reward(obs, chunks, goal) -> (B, N)."""

    def reward(self, obs, chunks, goal):
        return -chunks.float().abs().mean((-1, -2))  # prefers small actions


def _tiny_value(w: int = W) -> ValueSelector:
    """A critic fitted in a few steps on (M, N) states whose returns favour a large first action dim."""
    g = torch.Generator().manual_seed(3)
    pooled, cands = torch.randn(32, N, w, generator=g), torch.randn(32, N, H, A, generator=g)
    net, _ = fit_value(value_inputs(pooled, cands), cands[..., 0].sum(-1), (H, A), hidden=16, depth=1, steps=20)
    return ValueSelector(net)


def _tiny_dagger(w: int = W) -> DaggerSelector:
    """An expert-chunk predictor fitted in a few steps on random states."""
    g = torch.Generator().manual_seed(3)
    summary, pooled = torch.randn(32, D + S, generator=g), torch.randn(32, N, w, generator=g)
    cands = torch.randn(32, N, H, A, generator=g)
    net, _ = fit_dagger(dagger_inputs(summary, pooled, cands, A), cands, torch.randn(32, H, A, generator=g), hidden=16,
                        depth=1, steps=20)
    return DaggerSelector(net)


def _tiny_cfn(w: int = W) -> CfnSelector:
    net, _ = fit_cfn(_low_rank_features(64, w), flips=8, hidden=16, depth=1, steps=20)
    return CfnSelector(net)


# Every registered selector must have a builder here, so a new one is tested the day it is registered.
BUILDERS = {
    "first": lambda: make_selector("first"),
    "consistency": lambda: make_selector("consistency"),
    "coherence": lambda: make_selector("coherence"),
    "cfn": _tiny_cfn,
    "world_model": lambda: WorldModelSelector(_RewardModel()),
    "value": _tiny_value,
    "dagger": _tiny_dagger,
    # the medoid everywhere but on the fake observation's second instruction
    "gated": lambda: GatedSelector(make_selector("consistency"), {(4, 5, 6, 0)}),
}


def test_every_registered_selector_has_a_test_builder() -> None:
    assert sorted(BUILDERS) == selector_names()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_select_returns_one_candidate_and_its_score(name: str) -> None:
    sel = BUILDERS[name]()
    assert isinstance(sel, ChunkSelector) and sel.name == name
    g = torch.Generator().manual_seed(1)
    cands = torch.randn(B, N, H, A, generator=g)
    feats = torch.randn(B, N, H, W, generator=g)
    obs, prefix = _obs_prefix()
    chunk, scores = sel.select(cands, obs=obs, prefix=prefix, features=feats)
    assert chunk.shape == (B, H, A) and scores.shape == (B, N)
    assert torch.isfinite(scores).all()
    for b in range(B):
        k = int(scores[b].argmax())
        assert torch.equal(chunk[b], cands[b, k])  # one of the candidates, the best-scored one
    # One candidate: it is the answer, whatever the selector.
    one, s1 = sel.select(cands[:, :1], obs=obs, prefix=prefix, features=feats[:, :1])
    assert torch.equal(one, cands[:, 0]) and s1.shape == (B, 1)
    # Every selector takes the previous plan (selectors that do not use it ignore it).
    ref = torch.randn(B, H // 2, A, generator=g)
    chunk, scores = sel.select(cands, obs=obs, prefix=prefix, features=feats, reference=ref)
    assert torch.isfinite(scores).all() and all(torch.equal(chunk[b], cands[b, int(scores[b].argmax())]) for b in range(B))


def test_first_and_consistency_choices() -> None:
    cands = torch.zeros(1, 5, H, A)
    cands[0, 0] += 10.0  # an outlier first draw
    for k, v in enumerate([0.0, 0.1, -0.1, -0.2]):
        cands[0, k + 1] += v
    assert torch.equal(make_selector("first").select(cands)[0], cands[:, 0])
    chunk, scores = make_selector("consistency").select(cands)
    assert torch.equal(chunk, cands[:, 1])  # the medoid, not the outlier nor the mean
    assert int(scores.argmin()) == 0


def test_consistency_ignores_padded_action_dims() -> None:
    cands = torch.zeros(1, 3, H, A)
    cands[0, 1, :, 0] = 0.2
    cands[0, 2, :, 0] = 0.3  # real dim 0: {0, 0.2, 0.3}, medoid 0.2 (candidate 1)
    cands[0, 1, :, 2] = 5.0  # padded dim: garbage the robot never receives
    prefix = SimpleNamespace(extras={"action_dim_mask": torch.tensor([[True, True, False]])})
    chunk, _ = make_selector("consistency").select(cands, prefix=prefix)
    assert torch.equal(chunk, cands[:, 1])
    chunk_nomask, _ = make_selector("consistency").select(cands)
    assert torch.equal(chunk_nomask, cands[:, 2])  # the garbage would have decided otherwise


def test_coherence_keeps_the_current_plan_between_two_modes() -> None:
    """Three candidates go one way, two the other: the medoid follows the majority; with a previous plan
    that went the minority's way, coherence keeps that plan. Padded dims count for neither term."""
    cands = torch.zeros(1, 5, H, A)
    cands[0, :3, :, 0] = 1.0 + 0.05 * torch.arange(3.0)[:, None]  # mode +1: candidates 0, 1, 2
    cands[0, 3:, :, 0] = -1.0 - 0.05 * torch.arange(2.0)[:, None]  # mode -1: candidates 3, 4
    medoid, _ = make_selector("consistency").select(cands)
    assert torch.equal(make_selector("coherence").select(cands)[0], medoid)  # no plan yet: the medoid
    assert float(medoid[0, 0, 0]) > 0
    ref = torch.full((1, 2, A), 0.0)
    ref[..., 0] = -1.0  # the old plan: the -1 mode
    chunk, scores = make_selector("coherence").select(cands, reference=ref)
    assert torch.equal(chunk, cands[:, 3]) and int(scores.argmax()) == 3
    # weight 0 is the medoid again; a plan differing only in a padded dim changes nothing.
    assert torch.equal(make_selector("coherence", weight=0.0).select(cands, reference=ref)[0], medoid)
    prefix = SimpleNamespace(extras={"action_dim_mask": torch.tensor([[True, True, False]])})
    padded_only = torch.zeros(1, 2, A)
    padded_only[..., 2] = 50.0
    a, _ = make_selector("coherence").select(cands, prefix=prefix, reference=padded_only)
    assert torch.equal(a, medoid)
    # The decay weighs the first planned step most: agreeing on step 0 beats agreeing on step 1.
    two = torch.zeros(1, 2, 2, 1)
    two[0, 0, 0], two[0, 1, 1] = 1.0, 1.0  # candidate 0 deviates at step 0, candidate 1 at step 1
    assert int(make_selector("coherence", decay=0.5).select(two, reference=torch.zeros(1, 2, 1))[1].argmax()) == 1
    # reference_start: the plan is for steps 1.. (step 0 will be late): only step 1 is compared, with full weight.
    late = make_selector("coherence", decay=0.5).select(two, reference=torch.zeros(1, 1, 1), reference_start=1)[1]
    assert int(late.argmax()) == 0


def test_a_reference_selector_without_reference_start_still_works() -> None:
    """A plugin selector written before ``reference_start`` existed gets the plan as before; a plan that
    starts later is an error it would otherwise misread."""
    from policies.selectors.base import ChunkSelector

    class Older(ChunkSelector):
        name, needs_reference = "older", True

        def score(self, candidates, *, obs, prefix, features, reference=None):
            return -candidates.flatten(2).abs().sum(-1)

    cands = torch.zeros(1, 2, H, A)
    cands[0, 0] = 1.0
    assert int(Older().select(cands, reference=torch.zeros(1, 2, A))[1].argmax()) == 1
    with pytest.raises(ValueError, match="takes no reference_start"):
        Older().select(cands, reference=torch.zeros(1, 2, A), reference_start=1)


def test_coherence_compares_the_reference_from_its_start_step() -> None:
    """``reference_start=s``: the reference is the plan for steps s.., so a candidate agreeing with it there
    wins even if another agrees with it at steps 0.. (what the plan would be without the shift)."""
    cands = torch.zeros(1, 2, H, A)
    ref = torch.ones(1, 2, A)
    cands[0, 0, 2:4] = 1.0  # candidate 0 follows the plan at steps 2, 3
    cands[0, 1, 0:2] = 1.0  # candidate 1 has the same values at steps 0, 1
    sel = make_selector("coherence", weight=10.0)
    assert int(sel.select(cands, reference=ref)[1].argmax()) == 1
    assert int(sel.select(cands, reference=ref, reference_start=2)[1].argmax()) == 0


def test_coherence_bad_reference_and_config() -> None:
    cands = torch.zeros(2, 3, H, A)
    for bad in (torch.zeros(2, H + 1, A), torch.zeros(1, 2, A), torch.zeros(2, 2, A + 1), np.zeros((2, 2, A))):
        with pytest.raises(ValueError, match=r"reference must be \(2, H', 3\) with 1 <= H' <= 4"):
            make_selector("coherence").select(cands, reference=bad)
    with pytest.raises(ValueError, match="reference has NaN"):
        make_selector("coherence").select(cands, reference=torch.full((2, 2, A), float("nan")))
    with pytest.raises(ValueError, match=r"reference must be \(2, H', 3\) with 1 <= H' <= 1 .* from step 3"):
        make_selector("coherence").select(cands, reference=torch.zeros(2, 2, A), reference_start=3)
    for start in (-1, H, 1.5):
        with pytest.raises(ValueError, match=r"reference_start must be an int in \[0, 4\)"):
            make_selector("coherence").select(cands, reference=torch.zeros(2, 1, A), reference_start=start)
    with pytest.raises(ValueError, match="decay=0"):
        make_selector("coherence", decay=0.0)
    assert make_selector("coherence", weight=2.0).config().weight == 2.0


def test_non_finite_candidates_are_never_chosen() -> None:
    cands = torch.zeros(2, 3, H, A)
    cands[0, 0, 1, 1] = float("nan")
    cands[0, 1, 0, 0] = float("inf")
    chunk, scores = make_selector("first").select(cands)
    assert torch.isfinite(chunk).all() and torch.equal(chunk[0], cands[0, 2])
    assert scores[0, 0] == -torch.inf and scores[0, 1] == -torch.inf
    cands[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"batch items \[1\]"):
        make_selector("consistency").select(cands)


def test_bad_inputs_and_names() -> None:
    with pytest.raises(UnknownNameError, match="known selectors: .*consistency.*Did you mean 'consistency'"):
        make_selector("consistensy")
    with pytest.raises(ValueError, match=r"\(B, N, H, A\)"):
        make_selector("first").select(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="return_features"):
        _tiny_cfn().select(torch.zeros(1, 2, H, A))
    with pytest.raises(ValueError, match="width 16"):
        _tiny_cfn().select(torch.zeros(1, 2, H, A), features=torch.zeros(1, 2, H, W + 1))
    with pytest.raises(ValueError, match="needs a world model.*--selector.path"):
        make_selector("world_model")
    with pytest.raises(ValueError, match="needs a world model"):
        WorldModelSelector(None)
    with pytest.raises(ValueError, match="vla post-train cfn"):
        make_selector("cfn")  # no path, no policy with a saved CFN
    with pytest.raises(FileNotFoundError, match="vla post-train cfn"):
        make_selector("cfn", SimpleNamespace(selector_dir=Path("/nonexistent/selector")))


def test_cfn_counts_training_features_higher_than_noise() -> None:
    """After a short fit, familiar features have a lower 1/count (mean squared flip) than OOD noise."""
    train = _low_rank_features(512)
    net, report = fit_cfn(train, flips=16, hidden=64, depth=2, steps=300, seed=0)
    noise = train.mean(0) + train.std(0) * torch.randn(512, W)  # same marginals, none of the structure
    inv_train = net.inverse_count(train).mean()
    inv_noise = net.inverse_count(noise).mean()
    assert inv_train < 0.5 * inv_noise, (float(inv_train), float(inv_noise))
    assert report["inverse_count_train"] < report["inverse_count_noise"]
    # Unfitted, the random prior dominates: counts ~1 everywhere (nothing is familiar yet).
    fresh = CoinFlipNetwork(W, flips=16, hidden=64)
    fresh.calibrate(train)
    assert 0.5 < float(fresh.inverse_count(train).mean()) < 3.0
    # The selector prefers the familiar candidate.
    feats = torch.stack([train[:1], noise[:1]], 1)[:, :, None].expand(1, 2, H, W)  # (1, 2, H, W)
    chunk, scores = CfnSelector(net).select(torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, H, A), features=feats)
    assert scores[0, 0] > scores[0, 1] and float(chunk[0, 0, 0]) == 0.0


@pytest.mark.parametrize("center", [False, True])
def test_cfn_save_load_roundtrip(tmp_path: Path, center: bool) -> None:
    sel = _tiny_cfn()
    sel.center = center
    sel.save_pretrained(tmp_path / "selector")
    again = load_selector(tmp_path / "selector")
    assert isinstance(again, CfnSelector) and again.path == str(tmp_path / "selector") and again.center == center
    feats = torch.randn(2, 5, H, W)
    cands = torch.randn(2, 5, H, A)
    assert torch.allclose(sel.select(cands, features=feats)[1], again.select(cands, features=feats)[1])


# --- with a real (tiny) policy -------------------------------------------------------------------


# the tiny trained policy: the `checkpoint` fixture of conftest.py


def _raw(policy) -> dict:
    raw = {k: (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
           for k in policy.preprocessor.camera_map}
    raw["observation.state"] = np.zeros(policy.preprocessor.state_dim, np.float32)
    raw["task"] = "push the red block"
    return raw


def test_inference_bf16_runs_the_model_in_bf16_and_returns_fp32_actions(checkpoint) -> None:
    """`--policy.inference_bf16=true` (an execution override): the head's layers compute in bf16, the chunk that
    reaches the robot is fp32, finite and close to the fp32 policy's for the same noise, with or without selection."""
    from vla.policy import VLAPolicy

    plain = VLAPolicy.from_pretrained(checkpoint[0])
    fast = VLAPolicy.from_pretrained(checkpoint[0], overrides=["--inference_bf16=true"])
    assert fast.config.inference_bf16 and not plain.config.inference_bf16
    seen: dict[str, list] = {"plain": [], "fast": []}
    for name, pol in (("plain", plain), ("fast", fast)):
        lin = next(m for m in pol.head.modules() if isinstance(m, torch.nn.Linear))
        lin.register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.dtype))
    raw = _raw(plain)
    seed = lambda: torch.Generator().manual_seed(3)
    a32, a16 = plain.predict_action_chunk(raw, generator=seed()), fast.predict_action_chunk(raw, generator=seed())
    assert set(seen["plain"]) == {torch.float32} and set(seen["fast"]) == {torch.bfloat16}
    assert a16.dtype == np.float32 and a16.shape == a32.shape and np.isfinite(a16).all()
    assert np.abs(a16 - a32).max() < 0.1 * (np.abs(a32).max() + 1.0)

    class _Probe(ChunkSelector):  # records whether scoring ran under autocast
        name, autocast = "probe", []

        def score(self, candidates, *, obs, prefix, features):
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            return -candidates.float().abs().mean((-1, -2))

    probe = _Probe()
    chosen = fast.predict_action_chunk(raw, num_samples=4, generator=seed(), selector=probe)
    assert chosen.shape == a32.shape and np.isfinite(chosen).all()
    assert probe.autocast == [False]  # the selector scores in fp32 even inside the bf16 model call


def test_post_train_cfn_saves_with_policy_and_selects(checkpoint, tmp_path: Path) -> None:
    """`vla post-train cfn` writes <policy>/selector/; from_pretrained finds it by name; N candidates
    cost one backbone pass (a forward hook on the image encoder and a counter on encode_prefix)."""
    import shutil

    from post_training.cfn_train import main
    from vla.policy import VLAPolicy

    ckpt, data = checkpoint
    policy_dir = tmp_path / "policy"
    shutil.copytree(ckpt, policy_dir)
    args = ["--policy", str(policy_dir), "--dataset", str(data), "--max-observations", "12", "--num-samples", "4",
            "--batch-size", "6", "--hidden", "16", "--flips", "8", "--features-cache", str(tmp_path / "f.pt")]
    assert main([*args, "--steps", "5"]) == 0 and (tmp_path / "f.pt").is_file()
    assert main([*args, "--steps", "30"]) == 0  # refit from the cached candidate features
    assert (policy_dir / "selector" / "cfn.safetensors").is_file()
    import json

    fit = json.loads((policy_dir / "selector" / "cfn_config.json").read_text())["fit"]
    assert fit["steps"] == 30 and fit["frames"] == 12 and set(fit["heldout_selection_mse"]) >= {"first", "cfn", "oracle"}
    assert fit["heldout_selection_mse"]["oracle"] <= fit["heldout_selection_mse"]["first"]
    policy = VLAPolicy.from_pretrained(policy_dir)
    raw = _raw(policy)

    calls: list[int] = []
    policy.backbone.vision.conv_stem.register_forward_hook(lambda *a: calls.append(1))
    encode = policy.backbone.encode_prefix
    passes: list[int] = []
    policy.backbone.encode_prefix = lambda obs: (passes.append(1), encode(obs))[1]
    for name in ("first", "consistency", "cfn"):
        calls.clear(), passes.clear()
        chunk = policy.predict_action_chunk(raw, num_samples=8, selector=name)
        assert chunk.shape == (policy.config.chunk_size, policy.preprocessor.action_dim) and np.isfinite(chunk).all()
        assert policy.last_scores.shape == (1, 8)
        assert len(passes) == 1 and len(calls) == 1, (name, passes, calls)
    # The chosen chunk is one of the candidates: same noise, all candidates, then the argmax.
    g = lambda: torch.Generator().manual_seed(5)
    allc = policy.predict_action_chunk(raw, num_samples=8, generator=g())
    chosen = policy.predict_action_chunk(raw, num_samples=8, generator=g(), selector="cfn")
    assert np.allclose(chosen, allc[int(policy.last_scores[0].argmax())], atol=1e-5)
    # First at N candidates = the first draw of the same noise.
    first = policy.predict_action_chunk(raw, num_samples=8, generator=g(), selector="first")
    assert np.allclose(first, allc[0], atol=1e-6)
    # Batched input gives one chosen chunk per item.
    batched = {k: (np.stack([v, v]) if isinstance(v, np.ndarray) else [v, v]) for k, v in raw.items()}
    assert policy.predict_action_chunk(batched, num_samples=3, selector="consistency").shape[:1] == (2,)

    # coherence: the reference is raw actions, normalized like the candidates — a plan equal to one
    # candidate's first steps (heavily weighted) picks that candidate, whatever the medoid is.
    for j in (0, 5):
        spec = {"type": "coherence", "weight": 100.0}
        picked = policy.predict_action_chunk(raw, num_samples=8, generator=g(), selector=spec, reference=allc[j][:3])
        assert np.allclose(picked, allc[j], atol=1e-5), j
    with pytest.raises(ValueError, match="reference: .*pass a selector"):
        policy.predict_action_chunk(raw, reference=allc[0][:3])
    with pytest.raises(ValueError, match="reference_start=1: only with a reference"):
        policy.predict_action_chunk(raw, num_samples=2, selector="coherence", reference_start=1)
    with pytest.raises(ValueError, match=r"reference: expected \(H', 3\)"):
        policy.predict_action_chunk(raw, num_samples=2, selector="coherence", reference=allc[0][:, :2])

    broker = ChunkBroker(policy, num_samples=4, selector="cfn")
    assert broker.act(raw).shape == (policy.preprocessor.action_dim,)
    with pytest.raises(ValueError, match="needs a selector"):
        ChunkBroker(policy, num_samples=4)


def test_cfn_selector_missing_for_policy(checkpoint) -> None:
    from vla.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(checkpoint[0])
    with pytest.raises(FileNotFoundError, match="vla post-train cfn"):
        policy.predict_action_chunk(_raw(policy), num_samples=2, selector="cfn")
    with pytest.raises(ValueError, match="num_samples"):
        policy.predict_action_chunk(_raw(policy), num_samples=0, selector="first")


def test_world_model_selector_with_a_saved_world_model(checkpoint, tmp_path: Path) -> None:
    """Built from --selector.path; when the world model's encoder is the policy itself, the policy's
    prefix is reused (one backbone pass) and the scores equal the world model's reward on that obs."""
    from post_training.world_model import world_model_for
    from vla.policy import VLAPolicy

    ckpt = checkpoint[0]
    policy = VLAPolicy.from_pretrained(ckpt)
    torch.manual_seed(0)
    wm = world_model_for(policy, encoder_path=str(ckpt), width=32, num_layers=1, num_heads=2)
    torch.nn.init.normal_(wm.delta_out.weight, std=0.1)  # an untrained model predicts "no change": make it act
    wm.save_pretrained(tmp_path / "wm")
    raw = _raw(policy)
    passes: list[int] = []
    encode = policy.backbone.encode_prefix
    policy.backbone.encode_prefix = lambda obs: (passes.append(1), encode(obs))[1]
    spec = {"type": "world_model", "path": str(tmp_path / "wm")}
    chunk = policy.predict_action_chunk(raw, num_samples=5, selector=spec)
    assert chunk.shape == (policy.config.chunk_size, policy.preprocessor.action_dim) and len(passes) == 1
    sel = make_selector("world_model", policy, path=str(tmp_path / "wm"))
    assert sel.use_prefix and sel.world_model.encoder is policy
    assert policy.last_scores.shape == (1, 5) and np.isfinite(policy.last_scores).all()
    with pytest.raises(FileNotFoundError, match="not a world model"):
        make_selector("world_model", policy, path=str(tmp_path))
    import shutil  # a copy of the checkpoint (e.g. for evaluation) is still recognized as the encoder

    shutil.copytree(ckpt, tmp_path / "copy")
    copied = VLAPolicy.from_pretrained(tmp_path / "copy")
    assert make_selector("world_model", copied, path=str(tmp_path / "wm")).use_prefix


class _SelectingPolicy:
    """Asserts that the evaluator passes num_samples / selector to predict_action_chunk."""

    config = SimpleNamespace(n_action_steps=4)

    def reset(self) -> None:
        pass

    def __init__(self) -> None:
        self.chunks = 0

    def predict_action_chunk(self, obs, num_samples=1, selector=None, reference=None):
        assert (num_samples, selector) == (3, "consistency"), (num_samples, selector)
        # The previous chunk's not-executed steps (4..7) come back as the reference, from the 2nd chunk on.
        expected = None if self.chunks == 0 else np.full((4, 4), 0.1 * self.chunks, np.float32)
        assert (reference is None) if expected is None else np.allclose(reference, expected), (self.chunks, reference)
        self.chunks += 1
        return np.full((8, 4), 0.1 * self.chunks, np.float32)


def test_metaworld_evaluate_passes_the_selector() -> None:
    pytest.importorskip("metaworld")
    from benchmarks.metaworld.evaluate import evaluate

    res = evaluate(_SelectingPolicy, ["reach"], episodes_per_task=1, workers=1, max_steps=8, image_size=32,
                   progress=False, num_samples=3, selector="consistency")
    assert res["selector"] == "consistency" and res["num_samples"] == 3
    assert res["tasks"]["reach-v3"]["chunks"] == 2
    with pytest.raises(ValueError, match="selector"):
        evaluate(_SelectingPolicy, ["reach"], episodes_per_task=1, num_samples=3, progress=False)


def test_metaworld_eval_cli_takes_selector_fields() -> None:
    """`vla eval metaworld --selector dagger --selector.mixture_score=likelihood` becomes a config map; a field
    the selector's config lacks, or a field without --selector, is refused by name."""
    from benchmarks.metaworld.evaluate import selector_spec, build_parser, pop_selector_fields

    argv = ["--policy", "p", "--selector", "dagger", "--selector.path=d", "--selector.mixture_score=likelihood",
            "--policy.head.num_steps=5"]
    rest, fields = pop_selector_fields(argv)
    assert fields == {"mixture_score": "likelihood"} and "--selector.path=d" in rest and "--policy.head.num_steps=5" in rest
    args = build_parser().parse_known_args(rest)[0]
    assert selector_spec(args, fields) == {"type": "dagger", "path": "d", "mixture_score": "likelihood"}
    assert selector_spec(build_parser().parse_args(["--policy", "p", "--selector", "first"]), {}) == "first"
    with pytest.raises(SystemExit, match="selector 'dagger' has no such field .*mixture_score"):
        selector_spec(args, {"mixture": 2})
    with pytest.raises(SystemExit, match="--selector.mixture_score needs --selector NAME"):
        selector_spec(build_parser().parse_args(["--policy", "p"]), fields)
    with pytest.raises(SystemExit, match="--selector.path needs --selector NAME"):
        selector_spec(build_parser().parse_args(["--policy", "p", "--selector.path", "d"]), {})
    with pytest.raises(KeyError, match="dagger"):  # an unknown selector lists the known ones
        selector_spec(build_parser().parse_args(["--policy", "p", "--selector", "dagge"]), fields)
