"""Decide on TRAINING variations where a selector helps, and write the gate of the ``gated`` selector.

    python -m benchmarks.metaworld.selector_gate --policy P --selector dagger --selector.path D --num-samples 16 \\
        --tasks mt10 --episodes 20 --seed 3 [--policy.head.num_steps=5]      # -> D/gate.json
    vla eval metaworld --policy P --selector gated --selector.path D --num-samples 16 [--policy.head.num_steps=5]

Both arms — the policy alone (one candidate) and the policy with the selector — play the same training variations
with the same episode seeds (``vla eval metaworld --split train``), so every task gets a paired count: episodes
the selector solved that the policy alone failed (gained) and the reverse (lost). Selection is switched off for
a task's instruction when it lost more than it gained there by at least ``--margin`` episodes. The held-out
variations that ``vla eval`` reports on never enter the decision. Both arms' results.json are kept next to the
gate (``gate_eval_first.json``, ``gate_eval_selected.json``), and gate.json records the command, the per-task
evidence and the rule.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def gate_decision(base: dict[str, Any], selected: dict[str, Any], margin: int = 1) -> dict[str, Any]:
    """Two ``evaluate`` results of the same episodes (the policy alone, with the selector) -> per-task evidence and
    the tasks where selection is switched off (lost - gained >= ``margin``)."""
    from benchmarks.common import episode_outcomes, paired_comparison

    if margin < 1:
        raise ValueError(f"--margin: expected >= 1 episode, received {margin}")
    if set(base["tasks"]) != set(selected["tasks"]):
        raise ValueError(f"gate: the two runs played different tasks ({sorted(base['tasks'])} vs "
                         f"{sorted(selected['tasks'])})")
    evidence, off = {}, []
    for task in base["tasks"]:
        one = {"tasks": {task: base["tasks"][task]}}
        pair = paired_comparison(episode_outcomes([one]), episode_outcomes([{"tasks": {task: selected["tasks"][task]}}]))
        pair.update(first=base["tasks"][task]["success_rate"], selected=selected["tasks"][task]["success_rate"])
        evidence[task] = pair
        if pair["lost"] - pair["gained"] >= margin:
            off.append(task)
    return {"off_tasks": off, "evidence": evidence}


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import provenance
    from benchmarks.metaworld.evaluate import selector_spec, evaluate, pop_selector_fields
    from benchmarks.metaworld.tasks import INSTRUCTIONS
    from vla.config import parse_args_with_overrides

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Any --policy.FIELD=VALUE overrides the checkpoint's execution settings in both "
                                       "arms, as in `vla eval` (e.g. --policy.head.num_steps=5); any "
                                       "--selector.FIELD=VALUE sets a field of the gated selector's config, kept in "
                                       "gate.json (e.g. --selector.mixture_score=likelihood).")
    p.add_argument("--policy", required=True, help="policy checkpoint (pretrained_model/)")
    p.add_argument("--selector", required=True, help="the selector to gate, e.g. dagger")
    p.add_argument("--selector.path", dest="selector_path", required=True,
                   help="its assets folder; gate.json is written into it")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--tasks", default="mt10")
    p.add_argument("--episodes", type=int, default=20, help="training variations per task, per arm")
    p.add_argument("--seed", type=int, default=3, help="which training variations and episode seeds")
    p.add_argument("--margin", type=int, default=1, help="switch off where lost - gained >= this many episodes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    argv, fields = pop_selector_fields(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args_with_overrides(p, argv)
    if args.selector == "gated":
        p.error("--selector gated: name the selector to gate (e.g. dagger), not the gate itself")
    from policies.selectors import selector_config_class

    try:  # here, not after the first arm has played every episode
        selector_config_class(args.selector)
    except KeyError as e:  # UnknownNameError: lists the known names
        p.error(f"--selector: {e.args[0] if e.args else e}")
    folder = Path(args.selector_path)
    if not folder.is_dir():
        p.error(f"--selector.path {folder}: not a folder")
    spec = selector_spec(args, fields)  # {"type", "path", FIELD: VALUE...}; a field the config lacks is refused
    inner = {k: v for k, v in spec.items() if k != "path"}  # gate.json: the folder is the gated selector's path
    started = time.time()
    common = dict(tasks=args.tasks, episodes_per_task=args.episodes, seed=args.seed, workers=args.workers,
                  videos_per_task=0, progress=not args.no_progress, policy_overrides=overrides, split="train")
    base = evaluate(args.policy, **common)
    selected = evaluate(args.policy, num_samples=args.num_samples, selector=spec, **common)
    decision = gate_decision(base, selected, args.margin)
    gate = {"selector": inner, "off": [INSTRUCTIONS[t] for t in decision["off_tasks"]],
            **decision, "rule": f"off where lost - gained >= {args.margin} paired training episodes",
            "validation": {"split": "train", "seed": args.seed, "episodes_per_task": args.episodes,
                           "num_samples": args.num_samples, "policy_overrides": overrides,
                           "first": base["mean_success"], "selected": selected["mean_success"]},
            "provenance": provenance(started)}
    for name, res in (("first", base), ("selected", selected)):
        (folder / f"gate_eval_{name}.json").write_text(json.dumps(res, indent=2, default=str))
    (folder / "gate.json").write_text(json.dumps(gate, indent=2, default=str))
    for task, e in decision["evidence"].items():
        print(f"  {task:<26} first {e['first']:6.1%}  {args.selector} {e['selected']:6.1%}  gained {e['gained']:2d} "
              f"lost {e['lost']:2d}  {'OFF' if task in decision['off_tasks'] else 'on'}")
    print(f"gate: selection off for {decision['off_tasks'] or 'no task'}; training variations: first "
          f"{base['mean_success']:.1%}, {args.selector} {selected['mean_success']:.1%}; {time.time() - started:.0f} s "
          f"-> {folder / 'gate.json'} (use --selector gated --selector.path {folder})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
