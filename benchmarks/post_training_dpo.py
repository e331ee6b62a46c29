"""MT10 closed-loop success: a supervised checkpoint vs. the same checkpoint after DPO (same eval seeds).

    python -m benchmarks.post_training_dpo --arm supervised=outputs/selectors/eval_none_n1 \\
        --arm dpo=outputs/post_training/eval_dpo [--arm ...] --train_log dpo=outputs/post_training/dpo

Reads the ``results.json`` that ``vla eval metaworld --out DIR`` wrote for each arm (it refuses arms
evaluated with different seeds, tasks or episode counts), paired per episode: the same variation and the
same policy seed in both arms, so "both succeed / only one / neither" is counted exactly. Writes
``benchmarks/results/post_training_dpo.json`` (the eval commands, per-task success, the DPO runs' final
logged metrics) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import print_table, provenance, write_json


def _pairs(text: list[str], what: str) -> dict[str, Path]:
    out = {}
    for t in text:
        name, sep, path = t.partition("=")
        if not sep or not name:
            raise ValueError(f"--{what}: expected NAME=DIR, received {t!r}")
        out[name] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", action="append", required=True, help="NAME=EVAL_DIR (first = the reference arm)")
    p.add_argument("--train_log", action="append", default=[], help="NAME=DPO_OUTPUT_DIR (its train_log.jsonl)")
    p.add_argument("--out", default="benchmarks/results/post_training_dpo.json")
    args = p.parse_args(argv)
    started = time.time()
    arms = {k: json.loads((v / "results.json").read_text()) for k, v in _pairs(args.arm, "arm").items()}
    names = list(arms)
    ref = arms[names[0]]
    for k, r in arms.items():
        same = (r["seed"], r.get("first_episode", 0), r["episodes_per_task"], sorted(r["tasks"])) == \
            (ref["seed"], ref.get("first_episode", 0), ref["episodes_per_task"], sorted(ref["tasks"]))
        if not same:
            raise ValueError(f"arm {k!r} was evaluated with other seeds/tasks/episodes than {names[0]!r}")
    rows = []
    for task in ref["tasks"]:
        rows.append({"task": task, **{k: f"{r['tasks'][task]['success_rate']:.0%}" for k, r in arms.items()}})
    rows.append({"task": "MEAN", **{k: f"{r['mean_success']:.1%}" for k, r in arms.items()}})
    print_table(rows, ["task", *names])
    paired = {}
    for k in names[1:]:
        a = b = both = neither = 0
        for task in ref["tasks"]:
            for x, y in zip(ref["tasks"][task]["successful"], arms[k]["tasks"][task]["successful"]):
                a += x and not y
                b += y and not x
                both += x and y
                neither += not x and not y
        paired[k] = {f"only_{names[0]}": a, f"only_{k}": b, "both": both, "neither": neither,
                     "delta_points": round(100 * (arms[k]["mean_success"] - ref["mean_success"]), 1)}
        print(f"{k} vs {names[0]}: {paired[k]}")
    logs = {}
    for k, d in _pairs(args.train_log, "train_log").items():
        lines = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
        logs[k] = {"first": lines[0], "last": lines[-1]}
    data = {"benchmark": "MT10 success, supervised vs. DPO (same evaluation seeds)",
            "arms": {k: {"mean_success": r["mean_success"], "ci95": r["ci95"], "command": r["command"],
                         "commit": r.get("commit"), "per_task": {t: v["success_rate"] for t, v in r["tasks"].items()},
                         "wall_time_s": r["wall_time_s"]} for k, r in arms.items()},
            "paired_episodes": paired, "dpo_train_logs": logs, "provenance": provenance(started)}
    print(f"results: {write_json(Path(args.out), data)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
