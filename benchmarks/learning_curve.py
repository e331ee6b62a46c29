"""Plot a training run's loss curve from its ``train_log.jsonl``.

    python -m benchmarks.learning_curve outputs/metaworld/train_log.jsonl --out benchmarks/results/curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(log: Path, out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{log} has no records")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [r["loss"] for r in rows], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (train)")
    ax.set_title(title or log.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    print(f"wrote {plot(args.log, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
