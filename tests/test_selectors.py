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
from policies.selectors.value import ValueSelector, listwise_loss, value_inputs
from post_training.dagger_train import dagger_report, fit_dagger
from post_training.value_train import fit_value, selection_report
from vla.registry import UnknownNameError

B, N, H, A, W = 3, 6, 4, 3, 16
T, D, S = 5, 8, 2  # prefix tokens, backbone width, proprio dims of the fake observation


def _obs_prefix(b: int = B, seed: int = 2) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A fake normalized observation (state (b, S)) and prefix (hidden (b, T, D), the last token padded)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[:, -1] = False
    obs = SimpleNamespace(batch_size=b, state=torch.randn(b, S, generator=g))
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    from tests.helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("sel"), 2, 10, "--log_every=1")


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



def _ranking_states(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m states of N candidates: the return rewards moving toward a per-state goal that the observation
    part of the features encodes, plus a per-state offset the critic must ignore."""
    g = torch.Generator().manual_seed(seed)
    goal = torch.randn(m, 1, 1, A, generator=g)
    cands = goal + torch.randn(m, N, H, A, generator=g)
    obs_feat = torch.cat([goal.flatten(1), torch.randn(m, W - A, generator=g)], 1)  # (m, W)
    pooled = obs_feat[:, None] + 0.1 * torch.randn(m, N, W, generator=g)
    returns = -(cands - goal).pow(2).sum((-1, -2)) + 10 * torch.randn(m, 1, generator=g)
    return pooled, cands, returns


def test_value_critic_learns_to_rank_candidates_within_a_state() -> None:
    pooled, cands, returns = _ranking_states(600, 0)
    net, report = fit_value(value_inputs(pooled, cands), returns, (H, A), hidden=64, steps=400, seed=0)
    assert report["temperature"] > 0 and report["final_loss"] is not None
    vp, vc, vr = _ranking_states(200, 1)  # unseen states
    with torch.no_grad():
        rep = selection_report(net(value_inputs(vp, vc)), vr, vc)
    assert rep["spearman"] > 0.6, rep
    assert rep["gain_value"] > rep["gain_first"] + 0.5 * (rep["gain_oracle"] - rep["gain_first"]), rep
    # Listwise: a per-state constant added to the returns does not change the loss.
    s, r = torch.randn(5, N), torch.randn(5, N)
    assert torch.allclose(listwise_loss(s, r, 0.7), listwise_loss(s, r + torch.randn(5, 1), 0.7), atol=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        fit_value(value_inputs(pooled[:, :1], cands[:, :1]), returns[:, :1], (H, A))
    with pytest.raises(ValueError, match="NaN"):
        fit_value(value_inputs(pooled, cands), returns * float("nan"), (H, A), steps=1)


def test_value_selector_save_load_and_shape_errors(tmp_path: Path) -> None:
    sel = _tiny_value()
    g = torch.Generator().manual_seed(4)
    cands, feats = torch.randn(B, N, H, A, generator=g), torch.randn(B, N, H, W, generator=g)
    _, scores = sel.select(cands, features=feats)
    sel.save_pretrained(tmp_path / "v")
    again = load_selector(tmp_path / "v")
    assert again.name == "value" and torch.allclose(again.select(cands, features=feats)[1], scores)
    with pytest.raises(ValueError, match=r"fitted on chunks of 4 steps x 3 action dims"):
        sel.select(torch.randn(B, N, H + 1, A), features=feats)
    with pytest.raises(ValueError, match="inputs must have width"):
        sel.select(cands, features=torch.randn(B, N, H, W + 1))
    with pytest.raises(FileNotFoundError, match="vla post-train value"):
        make_selector("value", path=str(tmp_path / "nothing"))


def _assert_one_pass_selects_argmax(policy_dir: Path, raw: dict, selector: str) -> None:
    """The selector saved with the policy is found by name, the backbone runs once for 8 candidates, and the
    executed chunk is the best-scored of the candidates the same seed gives without selection."""
    from vla.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(policy_dir)
    passes: list[int] = []
    encode = policy.backbone.encode_prefix
    policy.backbone.encode_prefix = lambda obs: (passes.append(1), encode(obs))[1]
    seed = lambda: torch.Generator().manual_seed(5)
    chosen = policy.predict_action_chunk(raw, num_samples=8, generator=seed(), selector=selector)
    assert len(passes) == 1 and policy.last_scores.shape == (1, 8)
    allc = policy.predict_action_chunk(raw, num_samples=8, generator=seed())
    assert np.allclose(chosen, allc[int(policy.last_scores[0].argmax())], atol=1e-5)


def test_post_train_value_saves_with_policy_and_selects(checkpoint, tmp_path: Path) -> None:
    """Outcome data of the policy's own candidates -> `vla post-train value` -> <policy>/selector/value/;
    --selector value then runs the backbone once for N candidates and executes the best-scored one."""
    import json
    import shutil

    from post_training.value_train import main
    from vla.policy import VLAPolicy

    policy_dir = tmp_path / "policy"
    shutil.copytree(checkpoint[0], policy_dir)
    policy = VLAPolicy.from_pretrained(policy_dir)
    with pytest.raises(FileNotFoundError, match="benchmarks.metaworld.value_data"):
        policy.predict_action_chunk(_raw(policy), num_samples=2, selector="value")
    raw = _raw(policy)
    g = torch.Generator().manual_seed(0)
    a = policy.preprocessor.action_dim
    recs = [policy.sample_candidates(raw, 6, generator=g) for _ in range(40)]
    cands = torch.cat([r["normalized"][..., :a] for r in recs])  # (40, 6, H, A)
    assert recs[0]["actions"].shape == (1, 6, policy.config.chunk_size, a)
    data = {"features": torch.cat([r["features"].mean(-2) for r in recs]), "candidates": cands,
            "returns": torch.randn(40, 6), "final_reward": cands[..., 0, 0], "episode": torch.arange(40) // 4,
            "task": torch.zeros(40, dtype=torch.long), "meta": {"policy": str(policy_dir)}}
    torch.save(data, tmp_path / "old.pt")  # collected before the expert label existed
    with pytest.raises(ValueError, match="--target expert: not in every --data file"):
        main(["--policy", str(policy_dir), "--data", str(tmp_path / "old.pt"), "--steps", "1"])
    data["expert"] = -(cands[..., 0].mean(-1) - 0.3).pow(2)  # the "expert" prefers a mean first dim of 0.3
    torch.save(data, tmp_path / "d.pt")
    assert main(["--policy", str(policy_dir), "--data", str(tmp_path / "d.pt"), "--steps", "200", "--hidden", "32"]) == 0
    fit = json.loads((policy_dir / "selector" / "value" / "value_config.json").read_text())["fit"]
    assert fit["target"] == "expert" and fit["heldout_episodes"] == 2 and fit["train"]["spearman"] > 0.5, fit
    _assert_one_pass_selects_argmax(policy_dir, raw, "value")
    with pytest.raises(ValueError, match="not an outcome file"):
        torch.save({"features": data["features"]}, tmp_path / "bad.pt")
        main(["--policy", str(policy_dir), "--data", str(tmp_path / "bad.pt")])


def _dagger_states(m: int, seed: int) -> tuple[torch.Tensor, ...]:
    """m states whose expert chunk (a per-state goal) only the observation summary encodes; the N candidates
    scatter around 0, so the medoid is no closer to the expert than a random candidate."""
    g = torch.Generator().manual_seed(seed)
    goal = torch.randn(m, 1, A, generator=g)
    expert = goal.expand(m, H, A).contiguous()
    summary = torch.cat([goal.flatten(1), torch.randn(m, D + S - A, generator=g)], 1)
    cands = 1.5 * torch.randn(m, N, H, A, generator=g)
    pooled = torch.randn(m, N, W, generator=g)
    closeness = -(cands - expert[:, None]).pow(2).mean((-1, -2))
    return dagger_inputs(summary, pooled, cands, A), cands, expert, closeness


def test_dagger_predicts_the_expert_chunk_and_picks_the_closest_candidate() -> None:
    x, cands, expert, close = _dagger_states(800, 0)
    net, report = fit_dagger(x, cands, expert, hidden=64, steps=400, seed=0)
    assert report["final_loss"] is not None and report["states"] == 800
    rep = dagger_report(net, *_dagger_states(200, 1))  # unseen states
    assert rep["mse_prediction"] < 0.5 * rep["mse_candidate_mean"], rep
    assert rep["spearman"] > 0.6, rep
    assert rep["gain_dagger"] > rep["gain_consistency"] + 0.5 * (rep["gain_oracle"] - rep["gain_consistency"]), rep
    with pytest.raises(ValueError, match="one M"):
        fit_dagger(x[:-1], cands, expert)
    with pytest.raises(ValueError, match="NaN"):
        fit_dagger(x, cands, expert * float("nan"), steps=1)


def test_a_nan_candidate_never_poisons_the_choice() -> None:
    """dagger averages over the candidates: one NaN candidate (index 0) must neither be chosen nor turn every
    other score into NaN; a scorer that returns NaN everywhere falls back to the first finite candidate."""
    g = torch.Generator().manual_seed(6)
    cands, feats = torch.randn(B, N, H, A, generator=g), torch.randn(B, N, H, W, generator=g)
    cands[:, 0, 1, 2] = float("nan")
    feats[:, 0] = float("nan")
    obs, prefix = _obs_prefix()
    chunk, scores = _tiny_dagger().select(cands, obs=obs, prefix=prefix, features=feats)
    assert torch.isfinite(chunk).all() and torch.isfinite(scores[:, 1:]).all() and (scores[:, 0] == -torch.inf).all()

    class _AllNan(ChunkSelector):
        name = "all_nan"

        def score(self, candidates, *, obs, prefix, features):
            return torch.full(candidates.shape[:2], float("nan"))

    chunk, _ = _AllNan().select(cands)
    assert torch.equal(chunk, cands[:, 1])  # the first finite candidate, not index 0


def test_dagger_selector_reads_the_observation_save_load_and_errors(tmp_path: Path) -> None:
    sel = _tiny_dagger()
    g = torch.Generator().manual_seed(4)
    cands, feats = torch.randn(B, N, H, A, generator=g), torch.randn(B, N, H, W, generator=g)
    obs, prefix = _obs_prefix()
    _, scores = sel.select(cands, obs=obs, prefix=prefix, features=feats)
    # The score is minus the distance to one predicted chunk per observation: a candidate equal to the
    # prediction would score 0, and moving the observation moves the prediction.
    obs2, prefix2 = _obs_prefix(seed=9)
    assert not torch.allclose(sel.select(cands, obs=obs2, prefix=prefix2, features=feats)[1], scores)
    padded = prefix.hidden.clone()
    padded[:, -1] += 100.0  # a padded prefix token must not change anything
    same = SimpleNamespace(hidden=padded, mask=prefix.mask, extras={})
    assert torch.allclose(sel.select(cands, obs=obs, prefix=same, features=feats)[1], scores)
    sel.save_pretrained(tmp_path / "d")
    again = load_selector(tmp_path / "d")
    assert again.name == "dagger" and torch.allclose(again.select(cands, obs=obs, prefix=prefix, features=feats)[1], scores)
    with pytest.raises(ValueError, match="pass obs= and prefix="):
        sel.select(cands, features=feats)
    with pytest.raises(ValueError, match=r"fitted on chunks of 4 steps x 3 action dims"):
        sel.select(torch.randn(B, N, H + 1, A), obs=obs, prefix=prefix, features=torch.randn(B, N, H + 1, W))
    with pytest.raises(ValueError, match="inputs must have width"):
        sel.select(cands, obs=obs, prefix=prefix, features=torch.randn(B, N, H, W + 1))
    with pytest.raises(FileNotFoundError, match="vla post-train dagger"):
        make_selector("dagger", path=str(tmp_path / "nothing"))
    _tiny_value().save_pretrained(tmp_path / "v")  # a value critic's folder is not a dagger predictor
    with pytest.raises(ValueError, match="must output a chunk of 4 x 3 = 12 numbers, it outputs 1"):
        make_selector("dagger", path=str(tmp_path / "v"))


def test_post_train_dagger_saves_with_policy_and_selects(checkpoint, tmp_path: Path) -> None:
    """Expert-labelled states of the policy's own candidates -> `vla post-train dagger` -> <policy>/selector/dagger/;
    --selector dagger then runs the backbone once for N candidates and executes the best-scored one."""
    import json
    import shutil

    from post_training.dagger_train import main
    from vla.policy import VLAPolicy

    policy_dir = tmp_path / "policy"
    shutil.copytree(checkpoint[0], policy_dir)
    policy = VLAPolicy.from_pretrained(policy_dir)
    with pytest.raises(FileNotFoundError, match="vla post-train dagger"):
        policy.predict_action_chunk(_raw(policy), num_samples=2, selector="dagger")
    raw = _raw(policy)
    g = torch.Generator().manual_seed(0)
    a = policy.preprocessor.action_dim
    recs = [policy.sample_candidates(raw, 6, generator=g) for _ in range(40)]
    cands = torch.cat([r["normalized"][..., :a] for r in recs])  # (40, 6, H, A)
    expert = torch.full_like(cands[:, 0], 0.3)  # the "expert" always plays 0.3
    assert policy.normalize_actions(recs[0]["actions"][0, 0]).shape == (1, policy.config.chunk_size,
                                                                        policy.config.max_action_dim)
    # with a selector, sample_candidates also says which candidate a selecting policy would execute
    picked = policy.sample_candidates(raw, 6, generator=torch.Generator().manual_seed(1), selector="consistency")
    real = picked["normalized"][..., :a]  # the policy's medoid ignores padded action dims
    assert torch.allclose(picked["scores"], make_selector("consistency").select(real)[1], atol=1e-5)
    assert "scores" not in recs[0]
    data = {"features": torch.cat([r["features"].mean(-2) for r in recs]), "candidates": cands,
            "summary": torch.cat([r["summary"] for r in recs]), "expert": -(cands - expert[:, None]).pow(2).mean((-1, -2)),
            "episode": torch.arange(40) // 4, "task": torch.zeros(40, dtype=torch.long), "meta": {}}
    torch.save(data, tmp_path / "old.pt")  # collected before expert chunks were stored
    with pytest.raises(ValueError, match=r"missing \['expert_chunk'\]"):
        main(["--policy", str(policy_dir), "--data", str(tmp_path / "old.pt"), "--steps", "1"])
    data["expert_chunk"] = expert
    torch.save(data, tmp_path / "d.pt")
    assert main(["--policy", str(policy_dir), "--data", str(tmp_path / "d.pt"), "--steps", "300", "--hidden", "32"]) == 0
    fit = json.loads((policy_dir / "selector" / "dagger" / "value_config.json").read_text())["fit"]
    assert fit["heldout_episodes"] == 2, fit
    assert fit["heldout"]["mse_prediction"] < fit["heldout"]["mse_candidate_mean"], fit
    _assert_one_pass_selects_argmax(policy_dir, raw, "dagger")


@pytest.mark.sim
@pytest.mark.timeout(240)
def test_value_data_rolls_every_candidate_on_training_variations(tmp_path: Path) -> None:
    pytest.importorskip("metaworld")
    from benchmarks.metaworld import value_data
    from benchmarks.metaworld.evaluate import _set_policy_spec
    from benchmarks.metaworld.tasks import variations
    from benchmarks.metaworld.workers import run_jobs
    from tests.helpers import RandomCandidatePolicy

    var = variations("reach-v3", "train", 1, 0)[0][2]
    job = dict(task="reach-v3", episode=0, variation=var, cameras=("corner2",), image_size=32, samples=3, stride=2,
               max_steps=20, episode_seed=1)
    (res,) = list(run_jobs(value_data.collect_job, [job], 1, progress=False, initializer=_set_policy_spec,
                           initargs=(RandomCandidatePolicy, "cpu")))
    recs = res["records"]
    assert [r["step"] for r in recs] == [0, 8, 16]  # every 2nd re-plan of 4 executed steps, until 20 steps
    for r in recs:
        assert r["features"].shape == (3, 5) and r["candidates"].shape == (3, 8, 4)
        assert r["returns"].shape == (3,) and np.isfinite(r["returns"]).all()
        assert len(set(r["returns"].tolist())) == 3  # three random chunks, three outcomes
        assert r["expert"].shape == (3,) and (r["expert"] < 0).all()  # -MSE to the expert's chunk
        assert r["summary"].shape == (6,) and r["expert_chunk"].shape == (8, 4)
        # the stored expert chunk is the one the closeness was measured against (raw == normalized here)
        assert np.allclose(r["expert"], -((np.clip(r["candidates"], -1, 1) - r["expert_chunk"]) ** 2).mean((-1, -2)),
                           atol=1e-6)
    data = value_data.stack_records([res], ["reach-v3"])
    assert data["returns"].shape == data["expert"].shape == (3, 3) and data["episode"].tolist() == [0, 0, 0]
    assert data["expert_chunk"].shape == (3, 8, 4) and data["summary"].shape == (3, 6)
    # --no-rollouts: the same states and expert labels, no candidate outcomes
    (res2,) = list(run_jobs(value_data.collect_job, [{**job, "rollouts": False}], 1, progress=False,
                            initializer=_set_policy_spec, initargs=(RandomCandidatePolicy, "cpu")))
    data2 = value_data.stack_records([res2], ["reach-v3"])
    assert "returns" not in data2 and data2["expert_chunk"].shape == (3, 8, 4)


@pytest.mark.sim
@pytest.mark.timeout(240)
@pytest.mark.parametrize("by", ["returns", "expert"])
def test_oracle_selection_plays_the_evaluation_episodes(by: str) -> None:
    """The simulator-picked upper bound runs vla eval's episode plan and executes one candidate per re-plan."""
    pytest.importorskip("metaworld")
    from benchmarks.metaworld.evaluate import _set_policy_spec, episode_plan
    from benchmarks.metaworld.oracle_selection import oracle_episode
    from benchmarks.metaworld.workers import run_jobs
    from tests.helpers import RandomCandidatePolicy

    (i, ps, _, var, seed), = episode_plan("reach-v3", 0, 3, 1)
    assert i == 3 and ps % 2 == 1  # episode 3 of seed 0, a held-out (odd) variation pool
    job = dict(task="reach-v3", episode=i, variation=var, episode_seed=seed, cameras=("corner2",), image_size=32,
               max_steps=12, samples=3, by=by)
    (res,) = list(run_jobs(oracle_episode, [job], 1, progress=False, initializer=_set_policy_spec,
                           initargs=(RandomCandidatePolicy, "cpu")))
    assert res["chunks"] == 3 and res["length"] == 12 and 0 <= res["picked_first"] <= 3
