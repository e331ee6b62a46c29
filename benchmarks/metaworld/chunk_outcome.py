"""The simulator's own outcome of an action chunk from a saved state (ground truth for reward models).

    snap = snapshot(env)                      # MuJoCo integration state + MetaWorld's Python-side state
    outs = chunk_outcomes(env, chunks)        # chunks (K, H, 4): each rolled from snap, then snap restored
    outs[k] = {"return": sum of MetaWorld's dense rewards over the chunk, "final_reward": ..., "success": ...}

Why both halves of the state: MuJoCo's ``mjSTATE_INTEGRATION`` holds time, qpos, qvel, actuator and
mocap state, warm-start and controls, but MetaWorld also keeps Python attributes that its next step reads
(``curr_path_length``, the previous observation it stacks into the next one, ``_last_stable_obs``, ...).
Every plain value (array, number, bool) of the env's ``__dict__`` is copied; the model/data/renderer
objects are not values and are left alone. A test checks that a restored rollout repeats bit for bit.

Chunks are rolled on the raw MetaWorld env (no rendering: ~100x faster than stepping the wrapper).
Runs only inside benchmark worker processes (workers.py explains why the caller never loads Mesa).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

_PLAIN = (np.ndarray, np.generic, int, float, bool)


def snapshot(env) -> dict[str, Any]:
    """Everything a MetaWorldEnv's next steps depend on. ``env``: benchmarks.metaworld.env.MetaWorldEnv."""
    import mujoco

    raw = env.env
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    phys = np.empty(mujoco.mj_stateSize(raw.model, spec), dtype=np.float64)
    mujoco.mj_getState(raw.model, raw.data, phys, spec)
    py = {k: copy.deepcopy(v) for k, v in raw.__dict__.items() if isinstance(v, _PLAIN) or v is None}
    return {"physics": phys, "python": py}


def restore(env, snap: dict[str, Any]) -> None:
    import mujoco

    raw = env.env
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    mujoco.mj_setState(raw.model, raw.data, snap["physics"], spec)
    for k, v in snap["python"].items():
        setattr(raw, k, copy.deepcopy(v))
    mujoco.mj_forward(raw.model, raw.data)  # positions of bodies/sites that observations read
    # mj_forward's constraint solver rewrites qacc_warmstart (~1e-13 off); put the saved one back so
    # the next step starts from exactly the saved solver state.
    mujoco.mj_setState(raw.model, raw.data, snap["physics"], spec)


def roll_chunk(env, chunk: np.ndarray) -> dict[str, Any]:
    """Execute a (H, 4) chunk from the current state; stops early at MetaWorld's step limit."""
    raw = env.env
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != 4 or not np.isfinite(chunk).all():
        raise ValueError(f"chunk: expected finite actions of shape (H, 4), received shape {chunk.shape}")
    total, reward, success, steps = 0.0, 0.0, False, 0
    for a in chunk:
        if raw.curr_path_length >= raw.max_path_length:
            break
        _, r, _, _, info = raw.step(np.clip(a, -1.0, 1.0))
        total += float(r)
        reward = float(r)
        success = success or bool(info["success"])
        steps += 1
    return {"return": total, "final_reward": reward, "success": success, "steps": steps}


def chunk_outcomes(env, chunks: np.ndarray) -> list[dict[str, Any]]:
    """Roll each of K chunks (K, H, 4) from the current state; the state is restored after each."""
    snap = snapshot(env)
    out = []
    try:
        for c in np.asarray(chunks):
            out.append(roll_chunk(env, c))
            restore(env, snap)
    finally:
        restore(env, snap)
    return out


def expert_chunk(env, expert, raw_obs: dict[str, Any], horizon: int) -> np.ndarray:
    """(horizon, 4): the scripted expert's next ``horizon`` actions from this state (state restored).

    The expert only reads MetaWorld's 39-d state, so the rollout needs no rendering."""
    snap = snapshot(env)
    raw = env.env
    obs = dict(raw_obs)
    actions = []
    try:
        for _ in range(horizon):
            a = expert.predict_action_chunk(obs)[0]
            actions.append(a)
            if raw.curr_path_length >= raw.max_path_length:
                continue  # past the limit the expert's plan is still a fine reference
            env_obs, _, _, _, _ = raw.step(np.clip(a, -1.0, 1.0))
            obs["observation.environment_state"] = np.asarray(env_obs, dtype=np.float32)
    finally:
        restore(env, snap)
    return np.stack(actions).astype(np.float32)


def expert_closeness(env, expert, raw_obs: dict[str, Any], chunks: np.ndarray,
                     ref: np.ndarray | None = None) -> np.ndarray:
    """(K,) negated mean squared distance of each chunk (K, H, 4) to the scripted expert's own next H actions
    from this state (both clipped to the env's [-1, 1]; state restored). Higher = closer to the expert.
    ``ref``: that expert chunk (H, 4) when the caller already rolled it (``expert_chunk``)."""
    chunks = np.clip(np.asarray(chunks, dtype=np.float64), -1.0, 1.0)
    ref = expert_chunk(env, expert, raw_obs, chunks.shape[1]) if ref is None else ref
    return -((chunks - np.clip(ref, -1.0, 1.0)) ** 2).mean((-1, -2)).astype(np.float32)


def play(env, actions: np.ndarray) -> tuple[dict[str, Any], bool, int, bool]:
    """Execute actions (T, 4), T >= 1, on the wrapper env -> (last obs, success, steps taken, episode over)."""
    if len(actions) == 0:
        raise ValueError("play: expected at least one action, received none")
    obs, success, steps = None, False, 0
    for a in actions:
        obs, success, truncated = env.step(a)
        steps += 1
        if success or truncated:
            return obs, success, steps, True
    return obs, success, steps, False
