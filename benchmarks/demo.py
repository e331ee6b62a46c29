"""``vla demo`` (the README's first command): MetaWorld data -> train -> closed-loop eval -> report.

    vla demo                       # MT10, ~25 min on 2 CPU cores, prints the HTML report's path
    vla demo --steps 200 --episodes 4 --eval-episodes 2    # a quick smoke run

Each stage is skipped when its output already exists (delete ``--out`` to start over), so a second
run only re-evaluates.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.common import provenance, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--tasks", default="mt10")
    p.add_argument("--episodes", type=int, default=20, help="expert episodes per task for training data")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the metaworld-demo preset)")
    p.add_argument("--eval-episodes", type=int, default=5, help="evaluation episodes per task")
    p.add_argument("--max-steps", type=int, default=500, help="evaluation episode limit (MetaWorld's own: 500)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    # 1. Demonstrations from the scripted experts, written as a LeRobot dataset.
    data = args.out / "data"
    t = time.time()
    # generate.py writes this summary last: its presence means the dataset is complete.
    if not (data / "meta" / "metaworld_generation.json").exists():
        from benchmarks.metaworld.generate import generate_dataset

        if data.exists():
            print(f"[demo 1/3] {data} is incomplete (interrupted run): regenerating it")
            shutil.rmtree(data)
        print(f"[demo 1/3] generating {args.episodes} expert episodes per task ({args.tasks}) -> {data}")
        generate_dataset(data, args.tasks, args.episodes, seed=args.seed, workers=args.workers)
    else:
        print(f"[demo 1/3] reusing dataset {data}")
    stages["data_s"] = time.time() - t

    # 2. Train the CPU-default VLA (timm_lm backbone + flow-matching head).
    from vla.config import TrainConfig, parse_config
    from vla.presets import get_preset
    from vla.train import train

    from vla.checkpoint import LAST, MODEL_DIR, load_training_state

    train_dir = args.out / "train"
    last = train_dir / "checkpoints" / LAST
    overrides = [f"--dataset.root={data}", f"--output_dir={train_dir}", f"--seed={args.seed}"]
    if args.steps is not None:
        overrides.append(f"--steps={args.steps}")
    cfg = parse_config(TrainConfig, get_preset("metaworld-demo"), overrides)
    t = time.time()
    done = load_training_state(last)["step"] if last.exists() else 0
    if done >= cfg.steps:
        ckpt = last / MODEL_DIR
        print(f"[demo 2/3] reusing checkpoint {ckpt} ({done} steps)")
    else:
        cfg.resume = done > 0  # an interrupted run continues where it stopped
        print(f"[demo 2/3] training {cfg.steps} steps (batch {cfg.batch_size}"
              f"{f', resuming at {done}' if done else ''}) -> {train_dir}")
        ckpt = train(cfg)
    stages["train_s"] = time.time() - t

    # 3. Closed-loop evaluation on held-out task variations, with videos and an HTML report.
    from benchmarks.metaworld.evaluate import evaluate
    from benchmarks.metaworld.report import write_report

    report_dir = args.out / "report"
    print(f"[demo 3/3] evaluating {args.eval_episodes} episodes per task -> {report_dir}")
    t = time.time()
    results = evaluate(str(ckpt), args.tasks, args.eval_episodes, seed=args.seed + 1000, workers=args.workers,
                       max_steps=args.max_steps, video_dir=report_dir / "videos")
    stages["eval_s"] = time.time() - t
    demo = {**provenance(started), "stages_s": {k: round(v, 1) for k, v in stages.items()},
            "checkpoint": str(ckpt), "train_steps": cfg.steps, "train_batch_size": cfg.batch_size}
    results["commit"] = demo["commit"]
    results["demo"] = demo
    paths = write_report(results, report_dir)
    write_json(args.out / "demo_summary.json", {"mean_success": results["mean_success"], "ci95": results["ci95"],
                                                 "per_task": {k: v["success_rate"] for k, v in results["tasks"].items()},
                                                 **demo})
    for task, r in results["tasks"].items():
        print(f"  {task:<24} {r['success_rate']:6.1%}")
    print(f"mean success {results['mean_success']:.1%}; stages {json.dumps(demo['stages_s'])}")
    print(f"report: {Path(paths['html']).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
