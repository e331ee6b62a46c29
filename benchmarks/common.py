"""Provenance for every results file: exact command, commit, machine, wall time."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def git_commit(cwd: Path | str | None = None) -> str:
    """HEAD's hash (+ "-dirty" when files changed), or "uncommitted working tree" when there is none."""
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "uncommitted working tree"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "uncommitted working tree"


def command_line() -> str:
    """The command that started this process, as a user would type it ("vla eval metaworld ...",
    "python -m benchmarks.metaworld.evaluate ...")."""
    argv = list(sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        argv[0:1] = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif argv:
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}"


def provenance(started: float) -> dict[str, Any]:
    return {
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "wall_time_s": round(time.time() - started, 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in cols))


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after one warm-up call."""
    import statistics

    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def _pct(num: float, den: float, digits: int = 1) -> float:
    """Percent rounded half up (Python's ``round`` sends 62.5 to 62)."""
    scale = 10 ** digits
    value = int(100 * scale * num / den + 0.5)
    return value / scale if digits else value


# What must agree before results of several runs may be pooled into one row.
_SAME_ARM = ("policy", "selector", "num_samples", "policy_overrides", "n_action_steps_used", "max_steps")


def pool_evals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ``vla eval metaworld`` results.json dicts of ONE policy/arm (e.g. ``--episodes 10`` and
    ``--first-episode 10 --episodes 20`` runs, or ``--seed 0`` and ``--seed 1``) -> one pooled row: successes
    over all their episodes and a Wilson interval on the total. The runs must be of the same policy, selector,
    N, overrides and tasks, and no episode (seed, index) may be in two runs; ``runs`` lists (seed, first
    episode, episodes per task) so callers can check that compared rows ran the same evaluations. Note that
    two seeds draw from the same pool of held-out variations and may share some; episode ranges of one seed
    never do."""
    from benchmarks.metaworld.evaluate import wilson_interval

    for key in _SAME_ARM:
        values = {json.dumps(r.get(key) or None, sort_keys=True) for r in results}  # older files: key absent
        if len(values) > 1:
            raise ValueError(f"pool_evals: the runs differ in {key!r} ({sorted(values)}); pool only runs of one arm")
    runs = sorted((r["seed"], r.get("first_episode", 0), r["episodes_per_task"]) for r in results)
    for (s0, f0, n0), (s1, f1, _) in zip(runs, runs[1:]):
        if s0 == s1 and f1 < f0 + n0:
            raise ValueError(f"pool_evals: runs (seed, first episode, episodes) {runs} overlap at seed {s0}; "
                             "the same episodes would count twice")
    tasks = sorted(results[0]["tasks"])
    if any(sorted(r["tasks"]) != tasks for r in results):
        raise ValueError(f"pooled evaluations ran different tasks: {[sorted(r['tasks']) for r in results]}")

    def counts(t: dict, eps: int) -> tuple[int, int]:  # results.json has exact counts; older ones a rate
        return (int(t["successes"]), int(t["episodes"])) if "successes" in t else (round(t["success_rate"] * eps), eps)

    per = {t: [counts(r["tasks"][t], r["episodes_per_task"]) for r in results] for t in tasks}
    hits = {t: sum(h for h, _ in v) for t, v in per.items()}
    eps = {t: sum(n for _, n in v) for t, v in per.items()}
    total, n = sum(hits.values()), sum(eps.values())
    lo, hi = wilson_interval(total, n)
    chunks = sum(t.get("chunks", 0) for r in results for t in r["tasks"].values())
    policy_s = sum(t.get("policy_s", 0.0) for r in results for t in r["tasks"].values())
    one = len(results) == 1
    return {
        "success": _pct(total, n), "successes": total, "episodes": n,
        "ci95": [_pct(lo, 1), _pct(hi, 1)],
        "per_task": {t: _pct(hits[t], eps[t], 0) for t in tasks},
        "episodes_per_task": sum(r["episodes_per_task"] for r in results),
        "runs": runs, "tasks": tasks,
        "in_loop_ms_per_chunk": round(1000 * policy_s / chunks, 1) if chunks else None,
        "wall_s": round(sum(r["wall_time_s"] for r in results), 1),
        "command": results[0].get("command") if one else [r.get("command") for r in results],
        "commit": results[0].get("commit") if one else [r.get("commit") for r in results],
    }


def episode_outcomes(results: list[dict[str, Any]]) -> dict[tuple, bool]:
    """``vla eval metaworld`` results.json dicts of one arm -> {(task, variation, episode seed): success}: the key
    that names the same episode in every arm run with the same seed and episode range."""
    out: dict[tuple, bool] = {}
    for r in results:
        for task, t in r["tasks"].items():
            if "successful" not in t:
                raise ValueError(f"episode_outcomes: task {task!r} has no per-episode 'successful' list "
                                 "(results.json written before it existed?)")
            for ok, var, seed in zip(t["successful"], t["variations"], t["seeds"], strict=True):
                out[(task, tuple(var), int(seed))] = bool(ok)
    return out


def paired_comparison(base: dict[tuple, bool], arm: dict[tuple, bool]) -> dict[str, Any]:
    """Two arms paired by episode (``episode_outcomes``): episodes the arm solved and the baseline failed
    (``gained``), the reverse (``lost``), and the exact two-sided McNemar p (a binomial test of the discordant
    pairs at 1/2) — on paired episodes a far sharper test than comparing the two success rates' intervals."""
    from math import comb

    if set(base) != set(arm):
        raise ValueError(f"paired_comparison: the arms ran different episodes ({len(set(base) ^ set(arm))} not in both)")
    gained = sum(arm[k] and not base[k] for k in base)
    lost = sum(base[k] and not arm[k] for k in base)
    n = gained + lost
    p = min(1.0, 2 * sum(comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n) if n else 1.0
    return {"episodes": len(base), "gained": gained, "lost": lost, "mcnemar_p": round(p, 4)}
