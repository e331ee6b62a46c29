"""``world_model``: pick the candidate the post-training world model expects to earn the most reward.

The world model (``post_training/world_model.py``, contract ``reward(obs, chunks, goal) -> (B, N)``)
imagines the outcome of each candidate chunk from the current observation; the selector executes
the best one. There is no sensible default world model, so building this selector without one is an
error that says how to get one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from policies.selectors.base import ChunkSelector, SelectorConfig
from vla.types import Observation, Prefix


class WorldModelSelector(ChunkSelector):
    """score = world_model.reward(obs, candidates, goal), (B, N)."""

    name = "world_model"

    def __init__(self, world_model: Any, goal: Any = None, path: str | None = None, use_prefix: bool = False):
        """use_prefix: score from the policy's own prefix (no second backbone pass); only valid when the
        policy's backbone IS the world model's frozen encoder (``WorldModelConfig.build`` checks that)."""
        if world_model is None:
            raise ValueError("selector 'world_model' needs a world model: pass --selector.path=DIR (a world model "
                             "saved by `vla post-train world-model`) or WorldModelSelector(world_model=...)")
        if not callable(getattr(world_model, "reward", None)):
            raise TypeError(f"selector 'world_model': expected an object with reward(obs, chunks, goal) -> (B, N), "
                            f"received {type(world_model).__name__}")
        self.world_model, self.goal, self.path, self.use_prefix = world_model, goal, path, use_prefix

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        source = prefix if self.use_prefix and prefix is not None else obs
        if source is None:
            raise ValueError("selector 'world_model' needs the observation: select(candidates, obs=obs, ...)")
        with torch.no_grad():
            r = self.world_model.reward(source, candidates, self.goal)
        return torch.as_tensor(r, device=candidates.device).float()

    def config(self) -> WorldModelConfig:
        return WorldModelConfig(path=self.path)


def _same_checkpoint(a: Any, b: Any) -> bool:
    """Two checkpoint folders encode observations alike: the same path, or byte-identical weights and
    preprocessor files and the same backbone, cameras, image size and prompt length in their configs."""
    import filecmp
    import json
    from pathlib import Path

    from vla.policy import CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME

    a, b = Path(a).resolve(), Path(b).resolve()
    if a == b:
        return True
    for name in (WEIGHTS_NAME, PREPROCESSOR_NAME, CONFIG_NAME):
        if not ((a / name).is_file() and (b / name).is_file()):
            return False
    if not all(filecmp.cmp(a / n, b / n, shallow=False) for n in (WEIGHTS_NAME, PREPROCESSOR_NAME)):
        return False
    keys = ("backbone", "cameras", "image_size", "max_prompt_len")
    ca, cb = (json.loads((x / CONFIG_NAME).read_text()) for x in (a, b))
    return all(ca.get(k) == cb.get(k) for k in keys)


@SelectorConfig.register_subclass("world_model")
@dataclass
class WorldModelConfig(SelectorConfig):
    path: str | None = None  # a world model saved by `vla post-train world-model` (required)

    def build(self, policy: Any = None) -> WorldModelSelector:
        if self.path is None:
            return WorldModelSelector(None)  # raises the error that says what to pass
        import json
        from pathlib import Path

        # lazy: post_training builds on policies, never the other way round at import time
        from post_training.world_model import WM_CONFIG_NAME, WorldModel

        folder = Path(self.path)
        if not (folder / WM_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"selector 'world_model': {folder} is not a world model (no {WM_CONFIG_NAME}); "
                                    "train one with `vla post-train world-model`")
        # When the world model's frozen encoder is this very policy checkpoint — the same folder, or a copy with
        # the same weights file — reuse the policy (one copy in memory) and its prefix (one backbone pass for
        # candidates and rewards).
        enc = json.loads((folder / WM_CONFIG_NAME).read_text()).get("encoder")
        mine = getattr(policy, "selector_dir", None)
        same = enc is not None and mine is not None and _same_checkpoint(folder / enc, Path(mine).parent)
        wm = WorldModel.from_pretrained(folder, device=getattr(policy, "device", "cpu"),
                                        encoder=policy if same else None)
        return WorldModelSelector(wm, path=self.path, use_prefix=same)
