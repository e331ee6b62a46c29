"""Data-parallel scaling of `vla pretrain`: samples/s and memory per rank for 1 and 2 processes, ZeRO-1/2/3.

    python -m benchmarks.deepspeed_scaling                      # debug + metaworld presets (a few minutes)
    python -m benchmarks.deepspeed_scaling --presets debug --stages 2 --steps 8

Each configuration is a real `torchrun ... -m vla.train_deepspeed` launch with one torch thread per
process (OMP_NUM_THREADS=1), a fixed per-process batch (weak scaling: 2 processes train on twice the
samples per step) and `--log_every=1`; throughput is total samples / total time over the steps after
the first `--skip` (warm-up). Scaling efficiency = samples/s(2 processes) / (2 x samples/s(1 process)).
The one-process, two-thread run is the alternative use of the same 2 cores. Memory: peak RSS of every
rank, and the MiB of parameters and optimizer state (fp32 master + Adam moments) rank 0 holds.
Writes benchmarks/results/deepspeed_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, provenance, write_json

BATCH = 16  # per process
PRESET_ARGS = {
    "debug": ["--preset=debug", f"--batch_size={BATCH}"],
    "metaworld": ["--preset=metaworld", "--dataset.root=data/metaworld_mt10_50", f"--batch_size={BATCH}",
                  "--num_workers=0"],
}


def run_one(preset: str, nproc: int, stage: int, threads: int, steps: int, skip: int, out: Path) -> dict:
    args = [*PRESET_ARGS[preset], f"--output_dir={out}", f"--steps={steps}", "--log_every=1", "--save_every=0",
            f"--deepspeed.zero_stage={stage}", f"--torch_threads={threads}", "--warmup_steps=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vla.train_deepspeed", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    per_step = [rec["samples_per_s"] for rec in recs[skip:]]
    samples = BATCH * nproc
    sps = len(per_step) * samples / sum(samples / s for s in per_step)
    return {"preset": preset, "processes": nproc, "zero": stage, "threads_per_proc": threads,
            "samples_per_s": round(sps, 1), "peak_rss_mb_per_rank": [round(m) for m in recs[-1]["peak_rss_mb"]],
            # what ZeRO divides: this rank's parameters and optimizer (fp32 master + Adam moments), rank 0
            "params_mb_rank0": recs[-1]["params_mb"][0], "optimizer_mb_rank0": recs[-1]["optimizer_mb"][0],
            "final_loss": round(recs[-1]["loss"], 4), "launch_wall_s": round(wall, 1),
            "command": "OMP_NUM_THREADS=%d torchrun --standalone --nproc_per_node=%d -m vla.train_deepspeed %s"
                       % (threads, nproc, " ".join(a for a in args if not a.startswith("--output_dir=")))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["debug", "metaworld"], choices=sorted(PRESET_ARGS))
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the average (warm-up)")
    p.add_argument("--out", default="benchmarks/results/deepspeed_scaling.json")
    p.add_argument("--memory-only", action="store_true",
                   help="report only memory (short runs; timings dropped: use it without the heavy lock)")
    a = p.parse_args(argv)
    if a.skip >= a.steps:
        p.error(f"--skip ({a.skip}) must be < --steps ({a.steps})")
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds-scaling-") as tmp:
        for preset in a.presets:
            plan = [(1, s, 1) for s in a.stages] + [(2, s, 1) for s in a.stages]
            plan += [] if a.memory_only else [(1, 2, 2)]
            for nproc, stage, threads in plan:
                out = Path(tmp) / f"{preset}_{nproc}p_z{stage}_{threads}t"
                row = run_one(preset, nproc, stage, threads, a.steps, a.skip, out)
                rows.append(row)
                print(f"{preset} {nproc}p ZeRO-{stage} {threads}t: {row.get('samples_per_s')} samples/s, "
                      f"peak RSS {row['peak_rss_mb_per_rank']} MiB", flush=True)
    if a.memory_only:
        for r in rows:
            for k in ("samples_per_s", "final_loss", "launch_wall_s"):
                r.pop(k)
    for r in rows:
        if r["processes"] == 2 and not a.memory_only:
            one = next(x for x in rows if x["preset"] == r["preset"] and x["processes"] == 1
                       and x["zero"] == r["zero"] and x["threads_per_proc"] == 1)
            r["speedup_vs_1p"] = round(r["samples_per_s"] / one["samples_per_s"], 2)
            r["scaling_efficiency"] = round(r["speedup_vs_1p"] / 2, 2)
    print_table(rows, ["preset", "processes", "zero", "threads_per_proc", "samples_per_s", "speedup_vs_1p",
                       "scaling_efficiency", "peak_rss_mb_per_rank", "params_mb_rank0", "optimizer_mb_rank0"])
    write_json(Path(a.out), {"rows": rows, "steps": a.steps, "skip": a.skip, **provenance(started)})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
