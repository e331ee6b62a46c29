"""Training checkpoints: written atomically, resumed exactly.

    output_dir/checkpoints/step_000100/pretrained_model/   VLAPolicy.save_pretrained (or a LoRA adapter)
                                      /training_state.pt   optimizer, scheduler, RNG, step, data position
                                      /train_config.json
    output_dir/checkpoints/last -> step_000100             (symlink, swapped atomically)

A checkpoint is first written to a temporary folder and renamed into place, so a crash never leaves a
half-written ``step_*`` or ``last``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

LAST = "last"
TRAINING_STATE = "training_state.pt"
MODEL_DIR = "pretrained_model"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    write_model: Callable[[Path], None],
    training_state: dict[str, Any],
    train_config: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``ckpt_root/step_{step}`` atomically, point ``last`` at it, prune old ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp / MODEL_DIR)
    torch.save(training_state, tmp / TRAINING_STATE)
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2))
    return publish_checkpoint(tmp, final, ckpt_root, keep_last)


def publish_checkpoint(tmp: Path, final: Path, ckpt_root: Path, keep_last: int = 2) -> Path:
    """Rename a fully written ``tmp`` folder to ``final``, point ``last`` at it, prune old ones."""
    trash = None
    if final.exists():  # re-saving a step: move the old copy aside first, delete it only afterwards
        trash = ckpt_root / f".trash_{final.name}_{os.getpid()}"
        os.replace(final, trash)
    os.replace(tmp, final)
    link_tmp = ckpt_root / f".last_{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, ckpt_root / LAST)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    if keep_last > 0:
        # Only checkpoints OLDER than the one just written are candidates: never the newest.
        older = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name < final.name)
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_step_dir(ckpt_root: Path) -> Path | None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    return steps[-1] if steps else None


def load_training_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINING_STATE
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)
