"""The README's main job, end to end at toy scale: data -> train -> eval -> report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.sim
def test_demo_end_to_end_smoke(tmp_path: Path, capsys) -> None:
    from vla.cli import main

    out = tmp_path / "demo"
    args = ["demo", f"--out={out}", "--tasks=reach", "--episodes=1", "--steps=2", "--eval-episodes=1",
            "--max-steps=40", "--workers=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = out / "report" / "index.html"
    assert report.exists() and f"report: {report.resolve()}" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["per_task"]) == {"reach-v3"} and summary["train_steps"] == 2
    assert (out / "train" / "checkpoints" / "last" / "pretrained_model" / "model.safetensors").exists()
    # A second run reuses the data and the finished checkpoint and only re-evaluates.
    assert main(args) == 0
    assert "reusing dataset" in capsys.readouterr().out
