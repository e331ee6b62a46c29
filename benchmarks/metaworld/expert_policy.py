"""MetaWorld's scripted experts behind the policy interface that evaluation uses.

It reads `observation.environment_state` (the full 39-d state) and the instruction, so it serves all
50 tasks as one multi-task policy, like a VLA. Evaluating it measures the ceiling of the
demonstrations and checks the evaluation path itself (`vla eval metaworld --policy expert`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tasks import TASK_OF_INSTRUCTION


@dataclass
class ExpertConfig:
    n_action_steps: int = 1
    chunk_size: int = 1


class ScriptedExpertPolicy:
    """predict_action_chunk(raw_obs) -> (1, 4): the expert looks at the current state only, so its
    chunks are one action long. The class itself is the picklable factory `evaluate` accepts."""

    def __init__(self) -> None:
        self.config = ExpertConfig()
        self._experts: dict[str, Any] = {}

    def reset(self) -> None:
        """Experts are stateless functions of the current state; nothing carries over episodes."""
        return None

    def predict_action_chunk(self, obs: dict[str, Any]) -> np.ndarray:
        from metaworld.policies import ENV_POLICY_MAP

        instruction = obs.get("task")
        if instruction not in TASK_OF_INSTRUCTION:
            raise ValueError(f"task: expected one of the 50 MetaWorld instructions, received {instruction!r}")
        task = TASK_OF_INSTRUCTION[instruction]
        if task not in self._experts:
            self._experts[task] = ENV_POLICY_MAP[task]()
        state = np.asarray(obs["observation.environment_state"], dtype=np.float32)
        if state.shape != (39,):
            raise ValueError(f"observation.environment_state: expected shape (39,), received {state.shape}")
        with warnings.catch_warnings():  # the experts warn on every action they clip
            warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
            action = self._experts[task].get_action(state)
        return np.clip(action, -1.0, 1.0).astype(np.float32)[None]
