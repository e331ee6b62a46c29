"""Evaluation report: results.json, a per-task bar chart, MP4 episode videos, and one HTML page.

The HTML page links the chart and the videos by relative paths, so the output folder can be moved,
zipped or served as it is.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import command_line, git_commit  # noqa: F401  (re-exported)


def write_mp4(observations: Sequence[dict[str, Any]], cameras: Sequence[str], path: Path, fps: int) -> Path:
    """Cameras side by side, one frame per observation, H.264 via imageio's bundled ffmpeg."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [np.concatenate([o[f"observation.images.{c}"] for c in cameras], axis=1) for o in observations]
    # macro_block_size=16 lets imageio pad odd sizes; quality 8 of 10 keeps 128 px markers visible.
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=16,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def success_chart(results: dict[str, Any], path: Path) -> Path:
    """Bar per task with its 95% interval as error bars, and the mean as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    rates = np.array([results["tasks"][t]["success_rate"] for t in tasks]) * 100
    ci = np.array([results["tasks"][t]["ci95"] for t in tasks]) * 100
    err = np.stack([rates - ci[:, 0], ci[:, 1] - rates]).clip(min=0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(tasks) + 2), 4.2))
    ax.bar(range(len(tasks)), rates, yerr=err, capsize=3, color="#4c72b0", ecolor="#333333")
    ax.axhline(results["mean_success"] * 100, color="#c44e52", linestyle="--",
               label=f"mean {results['mean_success']:.1%}")
    ax.set_xticks(range(len(tasks)), [t.removesuffix("-v3") for t in tasks], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("success (%)")
    n = results["episodes_per_task"]
    ax.set_title(f"MetaWorld success per task ({n} episodes each, 95% Wilson intervals)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}.ok{color:#2a7d2a}.fail{color:#b33}
.videos{display:flex;flex-wrap:wrap;gap:12px}.videos figure{margin:0}
video{width:256px;image-rendering:pixelated;border:1px solid #ccc}figcaption{font-size:12px}
pre{background:#f4f4f4;padding:8px;white-space:pre-wrap;word-break:break-all}"""


def _html(results: dict[str, Any], chart: str, out_dir: Path) -> str:
    e = html.escape
    lo, hi = results["ci95"]
    rows = []
    for task, r in results["tasks"].items():
        lens = r["episode_lengths"]
        rows.append(
            f"<tr><td>{e(task)}</td><td>{r['success_rate']:.0%}</td><td>{r['successes']}/{r['episodes']}</td>"
            f"<td>{r['ci95'][0]:.0%}&ndash;{r['ci95'][1]:.0%}</td><td>{np.mean(lens):.0f}</td><td>{max(lens)}</td></tr>"
        )
    figures = []
    for task, r in results["tasks"].items():
        for v in r["videos"]:
            rel = os.path.relpath(v["path"], out_dir)
            cls, word = ("ok", "success") if v["success"] else ("fail", "failure")
            figures.append(
                f'<figure><video src="{e(rel)}" controls loop muted autoplay playsinline></video>'
                f'<figcaption>{e(task)} ep {v["episode"]}: <span class="{cls}">{word}</span></figcaption></figure>'
            )
    meta = {k: results.get(k) for k in ("policy", "commit", "seed", "first_episode", "episodes_per_task", "max_steps",
                                         "n_action_steps", "cameras", "image_size", "workers", "wall_time_s",
                                         "variation_pools", "interval_method")}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>MetaWorld evaluation</title>
<style>{_CSS}</style></head><body>
<h1>MetaWorld evaluation</h1>
<p><b>Mean success {results['mean_success']:.1%}</b> (95% CI {lo:.1%}&ndash;{hi:.1%}) over {len(results['tasks'])} tasks,
policy <code>{e(str(results['policy']))}</code>, {results['wall_time_s']:.0f} s.</p>
<img src="{e(chart)}" alt="success per task" style="max-width:100%">
<table><tr><th>task</th><th>success</th><th>episodes</th><th>95% CI</th><th>mean length</th><th>max length</th></tr>
{''.join(rows)}</table>
<h2>Episodes</h2><p>Camera images the policy saw, at {e(str(results.get('video_fps', 30)))} fps
(MetaWorld acts at 80 Hz).</p>
<div class="videos">{''.join(figures) or '<p>no videos recorded</p>'}</div>
<h2>Run</h2><pre>{e(results.get('command', ''))}</pre><pre>{e(json.dumps(meta, indent=1))}</pre>
<p>All numbers: <a href="results.json">results.json</a></p>
</body></html>
"""


def write_report(results: dict[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """Write results.json, success_by_task.png and index.html into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "png": out_dir / "success_by_task.png", "html": out_dir / "index.html"}
    paths["json"].write_text(json.dumps(results, indent=1))
    success_chart(results, paths["png"])
    paths["html"].write_text(_html(results, paths["png"].name, out_dir))
    return paths
