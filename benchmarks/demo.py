"""``vla demo`` (the README's first command): MetaWorld data -> train -> closed-loop eval -> report.

    vla demo                       # MT10, ~25 min on 2 CPU cores, prints the HTML report's path
    vla demo --steps 200 --episodes 4 --eval-episodes 2    # a quick smoke run

Each stage is skipped when its output already exists (delete ``--out`` to start over), so a second
run only re-evaluates.
"""
from __future__ import annotations

import argparse
import json
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
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    # 1. Demonstrations from the scripted experts, written as a LeRobot dataset.
    data = args.out / "data"
    t = time.time()
    if not (data / "meta" / "info.json").exists():
        from benchmarks.metaworld.generate import generate_dataset

        print(f"[demo 1/3] generating {args.episodes} expert episodes per task ({args.tasks}) -> {data}")
        generate_dataset(data, args.tasks, args.episodes, seed=args.seed, workers=args.workers)
    else:
        print(f"[demo 1/3] reusing dataset {data}")
    stages["data_s"] = time.time() - t

    # 2. Train the CPU-default VLA (timm_lm backbone + flow-matching head).
    from vla.config import TrainConfig, parse_config
    from vla.presets import get_preset
    from vla.train import train

    train_dir = args.out / "train"
    ckpt = train_dir / "checkpoints" / "last" / "pretrained_model"
    t = time.time()
    if not ckpt.exists():
        overrides = [f"--dataset.root={data}", f"--output_dir={train_dir}", f"--seed={args.seed}"]
        if args.steps is not None:
            overrides.append(f"--steps={args.steps}")
        cfg = parse_config(TrainConfig, get_preset("metaworld-demo"), overrides)
        print(f"[demo 2/3] training {cfg.steps} steps (batch {cfg.batch_size}) -> {train_dir}")
        ckpt = train(cfg)
    else:
        print(f"[demo 2/3] reusing checkpoint {ckpt}")
    stages["train_s"] = time.time() - t

    # 3. Closed-loop evaluation on held-out task variations, with videos and an HTML report.
    from benchmarks.metaworld.evaluate import evaluate
    from benchmarks.metaworld.report import write_report

    report_dir = args.out / "report"
    print(f"[demo 3/3] evaluating {args.eval_episodes} episodes per task -> {report_dir}")
    t = time.time()
    results = evaluate(str(ckpt), args.tasks, args.eval_episodes, seed=args.seed + 1000, workers=args.workers,
                       video_dir=report_dir / "videos")
    stages["eval_s"] = time.time() - t
    results.update(provenance(started))
    results["stages_s"] = {k: round(v, 1) for k, v in stages.items()}
    results["checkpoint"] = str(ckpt)
    paths = write_report(results, report_dir)
    write_json(args.out / "demo_summary.json", {k: results[k] for k in (
        "mean_success", "ci95", "stages_s", "checkpoint", "command", "commit", "machine", "wall_time_s")
        if k in results})
    for task, r in results["tasks"].items():
        print(f"  {task:<24} {r['success_rate']:6.1%}")
    print(f"mean success {results['mean_success']:.1%}; stages {json.dumps(results['stages_s'])}")
    print(f"report: {Path(paths['html']).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
