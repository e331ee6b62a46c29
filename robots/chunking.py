"""Joining action chunks that overlap in time, for a control loop with asynchronous inference.

A chunk predicted from the observation of tick ``s`` holds the actions meant for ticks s, s+1, ...,
s+H-1. With asynchronous inference it arrives ``d`` ticks later (the inference delay), while the
previous chunk is still executing, so:

* its first ``d`` actions are already in the past: dropped (executing them would replay the past and
  lag the robot by d ticks);
* for the next ``blend_steps`` ticks both chunks have an action: the command crossfades linearly from
  the old chunk's to the new one's, so a change of plan never shows up as a step in the command
  (a jump that the safety filter's step limit would otherwise have to absorb);
* after that the new chunk alone is followed, and the rest of the old one is discarded.

This is the "blending over the overlap" way of joining chunks (as in ACT's temporal ensembling, but
with one switch per chunk and a bounded crossfade). Real-time chunking proper (Black et al., 2025)
also makes the new chunk *agree* with the actions executed while it is computed, by guiding the
flow-matching sampler with them as an inpainting constraint: ``vla deploy --rtc=true`` sends
``planned(tick, H)`` with each request (``policies/rtc.py``), and the crossfade then joins two chunks
that already agree.
"""
from __future__ import annotations

import numpy as np


class ActionSchedule:
    """Planned actions by absolute control tick."""

    def __init__(self, blend_steps: int = 2) -> None:
        if blend_steps < 0:
            raise ValueError(f"blend_steps must be >= 0, received {blend_steps}")
        self.blend_steps = blend_steps
        self._start = 0  # tick of self._plan[0]
        self._plan = np.zeros((0, 0))
        self.chunks = 0
        self.dropped_late = 0  # actions dropped because their tick had passed when their chunk arrived

    def clear(self) -> None:
        self._start, self._plan = 0, np.zeros((0, 0))

    def remaining(self, tick: int) -> int:
        """How many planned actions are left from ``tick`` on (this tick included)."""
        return max(0, self._start + len(self._plan) - tick)

    def add(self, chunk: np.ndarray, obs_tick: int, now_tick: int) -> int:
        """Merge a chunk (H, A) computed from the observation of ``obs_tick``; the next action to be
        executed is the one of ``now_tick``. Returns how many of its actions were already late."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"ActionSchedule.add: expected a (H, A) chunk, received shape {chunk.shape}")
        if not np.isfinite(chunk).all():
            raise ValueError("ActionSchedule.add: the chunk has NaN/inf actions")
        if now_tick < obs_tick:
            raise ValueError(f"ActionSchedule.add: now_tick {now_tick} is before the chunk's obs_tick {obs_tick}")
        if len(self._plan) and self._plan.shape[1] != chunk.shape[1]:
            raise ValueError(f"ActionSchedule.add: action dim changed from {self._plan.shape[1]} to {chunk.shape[1]}")
        late = min(now_tick - obs_tick, len(chunk))
        self.dropped_late += late
        self.chunks += 1
        new = chunk[late:].copy()  # actions for now_tick, now_tick + 1, ...
        old = self._plan[max(0, now_tick - self._start):] if now_tick >= self._start else self._plan[:0]
        n = min(self.blend_steps, len(old), len(new))
        if n:
            w = (np.arange(1, n + 1) / (self.blend_steps + 1))[:, None]  # 1/(b+1) ... n/(b+1): old fades out
            new[:n] = (1 - w) * old[:n] + w * new[:n]
        if len(new) == 0 and len(old):
            # The whole chunk was late: keep what is still planned rather than stopping.
            new = old
        self._start, self._plan = now_tick, new
        return late

    def planned(self, tick: int, horizon: int) -> np.ndarray:
        """(h, A) the actions planned for ticks ``tick .. tick + horizon - 1`` (h <= horizon; may be 0)."""
        i = max(0, tick - self._start)
        if tick < self._start:  # nothing is planned before the plan starts: RTC needs a contiguous run
            return self._plan[:0].copy()
        return self._plan[i: i + horizon].copy()

    def action_at(self, tick: int) -> np.ndarray | None:
        """The action planned for ``tick`` (A,), or None when nothing is planned for it."""
        i = tick - self._start
        if 0 <= i < len(self._plan):
            return self._plan[i].copy()
        return None
