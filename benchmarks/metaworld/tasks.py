"""MetaWorld task lists, one instruction per task, and the train/eval split of task variations.

Task variations. MetaWorld defines a task's variations as the 50 (object, goal) configurations that
`metaworld.MT1(task, seed=k).train_tasks` draws from the task's randomization space. We use MetaWorld's
own pools and split them by pool seed, so training and evaluation never share a configuration,
whatever run seeds are used:

* training draws from the pools with even `k` (0, 2, 4, ...): pool 0 first, the next pool only when
  more than 50 episodes per task are asked for;
* evaluation draws from the pools with odd `k` (1, 3, 5, ...);
* the run seed picks which variations of a pool are used and in what order (a seeded permutation).

A variation fully determines an episode (MetaWorld's reset is deterministic once a variation is
set), so the only randomness left is the policy's own, which evaluation seeds per episode.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

VARIATIONS_PER_POOL = 50  # what one metaworld.MT1(...) draws per task

MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

# One imperative instruction per task. They are ours (MetaWorld ships none); they name the object and
# the motion, and differ between look-alike tasks (push / push-back / push-wall / pick-place) so the
# language alone tells the policy which task it is in.
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the ring and put it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "move the puck from the left bin into the right bin",
    "box-close-v3": "pick up the lid and put it on the box to close it",
    "button-press-topdown-v3": "press the button down from above",
    "button-press-topdown-wall-v3": "reach over the wall and press the button down from above",
    "button-press-v3": "push the button in from the front",
    "button-press-wall-v3": "reach past the wall and push the button in from the front",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial around",
    "disassemble-v3": "lift the ring off the peg",
    "door-close-v3": "push the door closed",
    "door-lock-v3": "turn the lock on the door down to lock it",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "turn the lock on the door to unlock it",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "hammer-v3": "pick up the hammer and drive the nail into the wall",
    "hand-insert-v3": "put the gripper into the hole in the table",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down from the front",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up from the front",
    "lever-pull-v3": "lift the lever up",
    "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
    "peg-unplug-side-v3": "pull the peg sideways out of the hole",
    "pick-out-of-hole-v3": "pick the puck up out of the hole and lift it to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal in the air",
    "pick-place-wall-v3": "pick up the puck, lift it over the wall and place it at the goal",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-v3": "slide the plate forward into the cabinet",
    "push-back-v3": "push the puck back towards the robot to the goal",
    "push-v3": "push the puck along the table to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-v3": "move the gripper to the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "soccer-v3": "push the ball into the goal",
    "stick-pull-v3": "grab the stick and use it to pull the box",
    "stick-push-v3": "grab the stick and use it to push the box",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-close-v3": "slide the window closed",
    "window-open-v3": "slide the window open",
}
MT50: tuple[str, ...] = tuple(sorted(INSTRUCTIONS))
TASK_OF_INSTRUCTION: dict[str, str] = {text: task for task, text in INSTRUCTIONS.items()}


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """"mt10" | "mt50" | "reach,push" | ["reach", "push-v3"] -> full names like "reach-v3" (order kept)."""
    if isinstance(tasks, str):
        if tasks.lower() in ("mt10", "mt50"):
            return list(MT10 if tasks.lower() == "mt10" else MT50)
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for name in tasks:
        full = name.strip() if name.strip().endswith("-v3") else f"{name.strip()}-v3"
        if full not in INSTRUCTIONS:
            import difflib

            close = difflib.get_close_matches(full, INSTRUCTIONS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"tasks: unknown MetaWorld task {name!r}{hint} (expected 'mt10', 'mt50' or names from "
                f"{', '.join(MT50)})"
            )
        if full not in out:
            out.append(full)
    if not out:
        raise ValueError(f"tasks: expected at least one task, received {tasks!r}")
    return out


def _pool(task: str, pool_seed: int) -> list[Any]:
    """The 50 `metaworld.Task` variations that `MT1(task, seed=pool_seed)` draws (~0.5 s per call)."""
    from .env import set_gl_backend

    set_gl_backend()  # metaworld imports mujoco, which picks its GL backend on import
    import metaworld

    return list(metaworld.MT1(task, seed=pool_seed).train_tasks)


def variations(task: str, split: str, n: int, seed: int) -> list[tuple[int, int, Any]]:
    """The first `n` variations of `task` for `split` ("train" | "eval") under run `seed`.

    Returns a list of (pool_seed, index_in_pool, metaworld.Task). Deterministic in (task, split, n,
    seed); train and eval never share a pool, so they never share a configuration.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', received {split!r}")
    if n < 0:
        raise ValueError(f"n: expected >= 0 episodes, received {n}")
    parity = 0 if split == "train" else 1
    out: list[tuple[int, int, Any]] = []
    block = 0
    while len(out) < n:
        pool_seed = 2 * block + parity
        pool = _pool(task, pool_seed)
        # crc32 of the name, not hash(): Python's str hash is salted per process.
        rng = np.random.default_rng([seed, pool_seed, zlib.crc32(task.encode())])
        for i in rng.permutation(len(pool))[: n - len(out)]:
            out.append((pool_seed, int(i), pool[int(i)]))
        block += 1
    return out
