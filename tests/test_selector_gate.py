"""The `gated` selector (another selector's choice except for switched-off instructions) and the decision that
writes its gate from paired episodes on training variations (benchmarks.metaworld.selector_gate)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.metaworld.selector_gate import gate_decision
from policies.selectors import make_selector
from policies.selectors.gate import GATE_FILE, GatedSelector
from tests.test_selectors import A, B, H, N, _obs_prefix, _raw


def test_gated_rows_execute_the_first_candidate_the_others_the_inner_choice() -> None:
    g = torch.Generator().manual_seed(0)
    cands = torch.randn(B, N, H, A, generator=g)
    cands[:, 0] += 10.0  # an outlier first candidate: the medoid never picks it
    obs, prefix = _obs_prefix()
    off = tuple(int(t) for t in obs.prompt_ids[1])
    inner_chunk, _ = make_selector("consistency").select(cands)
    chunk, scores = GatedSelector(make_selector("consistency"), {off}).select(cands, obs=obs, prefix=prefix)
    assert torch.equal(chunk[1], cands[1, 0]) and scores[1].tolist() == [0.0] + [-1.0] * (N - 1)
    assert torch.equal(chunk[[0, 2]], inner_chunk[[0, 2]]) and not torch.equal(chunk[0], cands[0, 0])
    # padding is not part of the instruction: the same tokens with a padded tail are still switched off
    obs.prompt_ids = torch.cat([obs.prompt_ids, torch.full((B, 2), 99)], 1)
    obs.prompt_mask = torch.cat([obs.prompt_mask, torch.zeros(B, 2, dtype=torch.bool)], 1)
    assert torch.equal(GatedSelector(make_selector("consistency"), {off}).select(cands, obs=obs)[0][1], cands[1, 0])
    with pytest.raises(ValueError, match="reads the instruction"):
        GatedSelector(make_selector("consistency"), {off}).select(cands)
    with pytest.raises(ValueError, match="itself gated"):
        GatedSelector(GatedSelector(make_selector("first"), set()), set())


def test_gated_config_reads_the_gate_and_the_policy_tokenizer(checkpoint, tmp_path: Path) -> None:
    """gate.json names the inner selector and the switched-off instructions; with the policy, an observation whose
    task is switched off executes the first candidate (the same chunk as `first` for the same noise), another task
    the inner selector's choice, and the backbone still runs once."""
    from vla.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(checkpoint[0])
    raw = _raw(policy)  # task "push the red block"
    (tmp_path / GATE_FILE).write_text(json.dumps({"selector": {"type": "consistency"}, "off": [raw["task"]]}))
    spec = {"type": "gated", "path": str(tmp_path)}
    seed = lambda: torch.Generator().manual_seed(3)
    for task, like in ((raw["task"], "first"), ("open the drawer", "consistency")):
        r = {**raw, "task": task}
        passes: list[int] = []
        encode = policy.backbone.encode_prefix
        policy.backbone.encode_prefix = lambda obs: (passes.append(1), encode(obs))[1]
        gated = policy.predict_action_chunk(r, num_samples=6, generator=seed(), selector=spec)
        policy.backbone.encode_prefix = encode
        assert len(passes) == 1
        ref = policy.predict_action_chunk(r, num_samples=6, generator=seed(), selector=like)
        assert np.allclose(gated, ref, atol=1e-6), task
    with pytest.raises(ValueError, match="needs --selector.path"):
        make_selector("gated")
    with pytest.raises(FileNotFoundError, match="selector_gate"):
        make_selector("gated", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        make_selector("gated", path=str(tmp_path))
    (tmp_path / GATE_FILE).write_text(json.dumps({"selector": {"type": "gated"}, "off": []}))
    with pytest.raises(ValueError, match="must name the inner selector"):
        make_selector("gated", path=str(tmp_path))


def _results(outcomes: dict[str, list[bool]]) -> dict:
    """A `vla eval metaworld` results dict with per-episode outcomes (same variations and seeds in every arm)."""
    return {"tasks": {t: {"successful": ok, "variations": [[0, i] for i in range(len(ok))],
                          "seeds": list(range(len(ok))), "success_rate": sum(ok) / len(ok)}
                      for t, ok in outcomes.items()}}


def test_gate_decision_switches_off_where_selection_lost_paired_episodes() -> None:
    base = _results({"peg": [1, 1, 1, 0, 0, 1], "pick": [0, 0, 0, 1, 0, 0], "door": [1, 1, 1, 1, 1, 1]})
    sel = _results({"peg": [0, 0, 1, 1, 0, 1], "pick": [1, 1, 0, 1, 0, 0], "door": [1, 1, 1, 1, 1, 0]})
    d = gate_decision(base, sel)
    assert d["off_tasks"] == ["peg", "door"]
    assert (d["evidence"]["peg"]["gained"], d["evidence"]["peg"]["lost"]) == (1, 2)
    assert (d["evidence"]["pick"]["gained"], d["evidence"]["pick"]["lost"]) == (2, 0)
    assert gate_decision(base, sel, margin=2)["off_tasks"] == []  # one episode net is not enough at margin 2
    with pytest.raises(ValueError, match="--margin"):
        gate_decision(base, sel, margin=0)
    with pytest.raises(ValueError, match="different tasks"):
        gate_decision(base, _results({"peg": [1] * 6}))
    with pytest.raises(ValueError, match="different episodes"):
        gate_decision(base, _results({"peg": [1] * 5, "pick": [1] * 6, "door": [1] * 6}))


def test_training_split_plays_other_variations_and_seeds() -> None:
    from benchmarks.metaworld.evaluate import episode_plan, evaluate
    from benchmarks.metaworld.tasks import variations

    ev, tr = episode_plan("reach-v3", 0, 0, 3), episode_plan("reach-v3", 0, 0, 3, "train")
    assert [(ps, pi) for _, ps, pi, _, _ in tr] == [(ps, pi) for ps, pi, _ in variations("reach-v3", "train", 3, 0)]
    assert {ps % 2 for _, ps, _, _, _ in ev} == {1} and {ps % 2 for _, ps, _, _, _ in tr} == {0}
    assert [s for *_, s in ev] != [s for *_, s in tr]
    with pytest.raises(ValueError, match="split: expected 'eval' or 'train'"):
        evaluate(lambda: None, "reach-v3", 1, split="test")


def test_selector_gate_plays_both_arms_on_training_variations_and_writes_the_gate(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    """The command's wiring, with the simulator replaced: both arms on the same training split with the same
    overrides, the selector arm with its assets folder, and gate.json naming the switched-off instructions."""
    from benchmarks.metaworld import selector_gate
    from benchmarks.metaworld.tasks import INSTRUCTIONS

    calls = []

    def fake_evaluate(policy, **kw):
        calls.append(kw)
        won = "selector" in kw  # the selector wins reach and loses peg-insert
        res = _results({"reach-v3": [won, won, False], "peg-insert-side-v3": [not won, not won, True]})
        res["mean_success"] = 0.5
        return res

    monkeypatch.setattr("benchmarks.metaworld.evaluate.evaluate", fake_evaluate)
    args = ["--policy", "P", "--selector", "dagger", "--selector.path", str(tmp_path), "--tasks", "reach-v3,peg-insert-side-v3",
            "--episodes", "3", "--no-progress", "--policy.head.num_steps=5"]
    assert selector_gate.main(args) == 0
    assert [c["split"] for c in calls] == ["train", "train"] and all(c["policy_overrides"] == ["--head.num_steps=5"]
                                                                    for c in calls)
    assert calls[1]["selector"] == {"type": "dagger", "path": str(tmp_path)} and calls[1]["num_samples"] == 16
    gate = json.loads((tmp_path / GATE_FILE).read_text())
    assert gate["off"] == [INSTRUCTIONS["peg-insert-side-v3"]] and gate["selector"] == {"type": "dagger"}
    assert gate["evidence"]["reach-v3"]["gained"] == 2 and (tmp_path / "gate_eval_selected.json").is_file()
    assert "peg-insert-side-v3" in capsys.readouterr().out
    # --selector.FIELD=VALUE: the selecting arm and gate.json's inner selector get it; an unknown field is refused
    assert selector_gate.main([*args, "--selector.mixture_score=likelihood"]) == 0
    assert calls[-1]["selector"] == {"type": "dagger", "path": str(tmp_path), "mixture_score": "likelihood"}
    assert json.loads((tmp_path / GATE_FILE).read_text())["selector"] == {"type": "dagger",
                                                                       "mixture_score": "likelihood"}
    with pytest.raises(SystemExit, match="has no such field"):
        selector_gate.main([*args, "--selector.bogus=1"])
    with pytest.raises(SystemExit):
        selector_gate.main(["--policy", "P", "--selector", "gated", "--selector.path", str(tmp_path)])
    assert "name the selector to gate" in capsys.readouterr().err
    n = len(calls)
    with pytest.raises(SystemExit):  # refused before either arm plays
        selector_gate.main(["--policy", "P", "--selector", "dager", "--selector.path", str(tmp_path)])
    assert "dagger" in capsys.readouterr().err and len(calls) == n
