"""The learned selectors (`value`, `dagger`) and their data: critics that rank a state's candidates, the expert-chunk
predictor, `vla post-train value|dagger` with a real (tiny) policy, and `benchmarks.metaworld.value_data` /
`oracle_selection` in the simulator. The registry-wide contract is in test_selectors.py."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from policies.selectors import ChunkSelector, load_selector, make_selector
from policies.selectors.dagger import dagger_inputs
from policies.selectors.value import listwise_loss, value_inputs
from post_training.dagger_train import dagger_report, fit_dagger
from post_training.value_train import fit_value, selection_report
from tests.test_selectors import (
    A,
    B,
    D,
    H,
    N,
    S,
    W,
    _obs_prefix,
    _raw,
    _tiny_dagger,
    _tiny_value,
)


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


def _bimodal_states(m: int, seed: int) -> tuple[torch.Tensor, ...]:
    """m states whose expert chunk is +goal or -goal by a coin the network never sees (the summary encodes only
    the goal). Candidate 0 is near +goal, 1 near -goal, the others near their average 0."""
    g = torch.Generator().manual_seed(seed)
    goal = 2.0 * torch.randn(m, 1, A, generator=g).sign()  # |goal| = 2 in every dim
    coin = torch.randint(0, 2, (m, 1, 1), generator=g).float() * 2 - 1
    expert = (coin * goal).expand(m, H, A).contiguous()
    summary = torch.cat([goal.flatten(1), torch.randn(m, D + S - A, generator=g)], 1)
    cands = 0.1 * torch.randn(m, N, H, A, generator=g)
    cands[:, 0] += goal
    cands[:, 1] -= goal
    pooled = torch.randn(m, N, W, generator=g)
    closeness = -(cands - expert[:, None]).pow(2).mean((-1, -2))
    return dagger_inputs(summary, pooled, cands, A), cands, expert, closeness


def test_a_mixture_picks_a_mode_where_a_point_prediction_picks_the_average(tmp_path: Path) -> None:
    """A bimodal expert: squared error predicts the average (0) and picks a candidate that is neither mode; the
    2-component mixture scores the candidates at the modes highest. It saves, loads and selects like the point one."""
    from policies.selectors.dagger import DaggerSelector, dagger_scores

    x, cands, expert, close = _bimodal_states(1200, 0)
    tx, tc, te, _ = _bimodal_states(300, 1)  # unseen states
    picks = {}
    for k in (0, 2):
        net, report = fit_dagger(x, cands, expert, hidden=64, steps=2000, seed=0, mixtures=k)
        assert report["mixtures"] == k
        picks[k] = dagger_scores(net, tx, tc).argmax(1)
        rep = dagger_report(net, tx, tc, te, -(tc - te[:, None]).pow(2).mean((-1, -2)))
        assert ("nll" in rep) == (k > 0), rep
    at_mode = {k: float((p < 2).float().mean()) for k, p in picks.items()}
    assert at_mode[0] < 0.2 and at_mode[2] > 0.9, at_mode
    sel = DaggerSelector(net, mixture_score="likelihood")
    assert sel.mixtures == 2 and sel.net.out_dim == 2 * (1 + 2 * H * A)
    sel.save_pretrained(tmp_path / "m")
    again = load_selector(tmp_path / "m")
    assert again.mixtures == 2 and again.mixture_score == "likelihood"
    g = torch.Generator().manual_seed(4)
    c, f = torch.randn(B, N, H, A, generator=g), torch.randn(B, N, H, W, generator=g)
    obs, prefix = _obs_prefix()
    assert torch.allclose(again.select(c, obs=obs, prefix=prefix, features=f)[1],
                          sel.select(c, obs=obs, prefix=prefix, features=f)[1])
    with pytest.raises(ValueError, match=r"mixture_score must be one of \('mode', 'likelihood'\), received 'mean'"):
        make_selector("dagger", path=str(tmp_path / "m"), mixture_score="mean")
    with pytest.raises(ValueError, match=r"mixtures \(--mixtures\) must be an int >= 0"):
        fit_dagger(x, cands, expert, steps=1, mixtures=-1)


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
    with pytest.raises(ValueError, match=r"must output a chunk of 4 x 3 = 12 numbers, or K x 25 .*it outputs 1"):
        make_selector("dagger", path=str(tmp_path / "v"))


def test_post_train_dagger_saves_with_policy_and_selects(checkpoint, tmp_path: Path, caplog) -> None:
    """Expert-labelled states of the policy's own candidates -> `vla post-train dagger` -> <policy>/selector/dagger/;
    --selector dagger then runs the backbone once for N candidates and executes the best-scored one. Used with
    other Euler steps than its data's candidates, it warns."""
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
            "episode": torch.arange(40) // 4, "task": torch.zeros(40, dtype=torch.long),
            "meta": {"num_steps": policy.config.head.num_steps}}
    torch.save(data, tmp_path / "old.pt")  # collected before expert chunks were stored
    with pytest.raises(ValueError, match=r"missing \['expert_chunk'\]"):
        main(["--policy", str(policy_dir), "--data", str(tmp_path / "old.pt"), "--steps", "1"])
    data["expert_chunk"] = expert
    torch.save(data, tmp_path / "d.pt")
    assert main(["--policy", str(policy_dir), "--data", str(tmp_path / "d.pt"), "--steps", "300", "--hidden", "32"]) == 0
    fit = json.loads((policy_dir / "selector" / "dagger" / "value_config.json").read_text())["fit"]
    assert fit["heldout_episodes"] == 2, fit
    assert fit["heldout"]["mse_prediction"] < fit["heldout"]["mse_candidate_mean"], fit
    with caplog.at_level("WARNING", logger="policies.selectors.value"):
        _assert_one_pass_selects_argmax(policy_dir, raw, "dagger")
        assert "fitted on candidates" not in caplog.text
        steps = policy.config.head.num_steps
        other = VLAPolicy.from_pretrained(policy_dir, overrides=[f"--head.num_steps={steps + 1}"])
        other.predict_action_chunk(raw, num_samples=2, selector="dagger")
    assert "selector 'dagger'" in caplog.text and f"sampled with head.num_steps={steps}," in caplog.text
    assert f"--policy.head.num_steps={steps + 1}" in caplog.text


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


def test_value_data_checks_policy_overrides_before_collecting(checkpoint, tmp_path: Path, capsys, monkeypatch) -> None:
    """`--policy.FIELD=VALUE` (e.g. the Euler steps the selector will see) is checked against the checkpoint's
    config up front, naming the field; other unknown arguments are refused like `vla eval` refuses them."""
    from benchmarks.metaworld import value_data

    base = ["--policy", str(checkpoint[0]), "--out", str(tmp_path / "d.pt")]
    with pytest.raises(SystemExit):
        value_data.main([*base, "--policy.head.nope=1"])
    assert "has no field 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        value_data.main([*base, "--bogus=1"])
    assert "unrecognized arguments: --bogus=1" in capsys.readouterr().err
    assert not (tmp_path / "d.pt").exists()
    # a valid override reaches every worker's policy and is recorded with the sampling steps it implies
    seen = {}

    def fake_run_jobs(fn, jobs, workers, desc, progress, initializer, initargs):
        seen["initargs"] = initargs
        yield {"success": True}

    monkeypatch.setattr("benchmarks.metaworld.workers.run_jobs", fake_run_jobs)
    monkeypatch.setattr(value_data, "stack_records", lambda results, tasks: {"expert": torch.zeros(1, 2)})
    assert value_data.main([*base, "--tasks", "reach-v3", "--episodes", "1", "--no-progress",
                            "--policy.head.num_steps=7"]) == 0
    assert seen["initargs"][3] == ["--head.num_steps=7"]
    meta = torch.load(tmp_path / "d.pt")["meta"]
    assert meta["num_steps"] == 7 and meta["policy_overrides"] == ["--head.num_steps=7"]
    assert meta["sampling"] == {"num_steps": 7} and meta["selector"] is None
    # --selector.FIELD=VALUE reaches the selecting policy (DAgger's next round); a field the config lacks is refused
    sel = ["--tasks", "reach-v3", "--episodes", "1", "--no-progress", "--selector", "dagger", "--selector.path", "D"]
    assert value_data.main([*base, *sel, "--selector.mixture_score=likelihood"]) == 0
    assert torch.load(tmp_path / "d.pt")["meta"]["selector"] == {"type": "dagger", "path": "D",
                                                                 "mixture_score": "likelihood"}
    with pytest.raises(SystemExit, match="selector 'dagger' has no such field"):
        value_data.main([*base, *sel, "--selector.bogus=1"])
    with pytest.raises(SystemExit, match="needs --selector NAME"):
        value_data.main([*base, "--selector.path", "D"])


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


def test_a_predictor_warns_when_the_candidates_are_drawn_otherwise(tmp_path: Path, caplog) -> None:
    """The fit data's sampling settings (``meta.sampling``; ``meta.num_steps`` in older files) against the policy's:
    a token head run greedy with a predictor fitted on temperature-1 draws is named, with the override that matches."""
    from policies.coarse_to_fine import CoarseToFineConfig
    from policies.selectors.value import VALUE_CONFIG, check_sampling, sampling_settings

    drawn = CoarseToFineConfig(temperature=1.0, greedy_first=True)
    assert sampling_settings(drawn) == {"temperature": 1.0, "top_k": 0, "greedy_first": True}
    (tmp_path / VALUE_CONFIG).write_text(json.dumps({"fit": {"collected": [
        {"sampling": sampling_settings(drawn)}, {"num_steps": 10}]}}))
    policy = lambda head: SimpleNamespace(config=SimpleNamespace(head=head))  # noqa: E731
    with caplog.at_level("WARNING", logger="policies.selectors.value"):
        check_sampling(tmp_path, policy(drawn), "dagger")
        assert "fitted on candidates" not in caplog.text
        check_sampling(tmp_path, policy(CoarseToFineConfig(temperature=0.0)), "dagger")
    assert "sampled with head.temperature=1.0, head.greedy_first=True" in caplog.text
    assert "--policy.head.temperature=0.0 --policy.head.greedy_first=False" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="policies.selectors.value"):  # a flow head: its steps, from the old key
        check_sampling(tmp_path, policy(SimpleNamespace(num_steps=5)), "value")
    assert "selector 'value'" in caplog.text and "head.num_steps=10," in caplog.text
