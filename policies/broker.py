"""The chunk broker: hands a controller one action per tick from the policy's latest chunk.

The policy predicts H actions at once; the broker executes the first ``n_action_steps`` of them and
then asks for a new chunk with a fresh observation (receding horizon, as in ACT / pi0 / LeRobot).
"""
from __future__ import annotations

import inspect
from collections import deque
from typing import Any, Callable, Mapping

import numpy as np


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (by name or through ``**kwargs``): optional per-call
    arguments such as ``reference=`` go only to policies that take them."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class ChunkBroker:
    def __init__(self, policy: Any, n_action_steps: int | None = None, num_samples: int = 1,
                 selector: Any = None) -> None:
        """num_samples / selector: sample N candidates per re-plan and execute the selector's choice
        (``policy.predict_action_chunk(raw, num_samples=N, selector=...)``, docs/selectors.md)."""
        h = policy.config.chunk_size
        self.n_action_steps = n_action_steps or policy.config.n_action_steps
        if not 1 <= self.n_action_steps <= h:
            raise ValueError(f"n_action_steps must be in [1, chunk_size={h}], got {self.n_action_steps}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if num_samples > 1 and selector is None:
            raise ValueError(f"num_samples={num_samples} needs a selector to choose among the candidates "
                             "(e.g. selector='consistency' or 'cfn')")
        self.num_samples, self.selector = num_samples, selector
        self.policy = policy
        self._takes_reference = selector is not None and accepts_keyword(policy.predict_action_chunk, "reference")
        self._queue: deque[np.ndarray] = deque()
        self._rest: np.ndarray | None = None  # the last chunk's actions beyond n_action_steps (never executed)
        self.chunks_requested = 0

    def reset(self) -> None:
        """Forget the queued actions and the last plan (call at episode start)."""
        self._queue.clear()
        self._rest = None
        self.policy.reset()

    def act(self, raw_obs: Mapping[str, Any]) -> np.ndarray:
        """-> (A,) the action for this control tick. Re-plans when the queue is empty."""
        if not self._queue:
            if self.selector is None:
                chunk = np.asarray(self.policy.predict_action_chunk(raw_obs))
            else:
                # The plan the old chunk had for the next ticks: selectors like `coherence` prefer agreeing with it.
                ref = {} if self._rest is None or not self._takes_reference else {"reference": self._rest}
                chunk = np.asarray(self.policy.predict_action_chunk(raw_obs, num_samples=self.num_samples,
                                                                    selector=self.selector, **ref))
            if chunk.ndim != 2:
                raise ValueError(f"ChunkBroker: expected a (H, A) chunk, got shape {chunk.shape}")
            if not np.isfinite(chunk).all():
                raise FloatingPointError("ChunkBroker: the policy returned a non-finite action chunk")
            self._queue.extend(chunk[: self.n_action_steps])
            self._rest = chunk[self.n_action_steps:] if self.n_action_steps < len(chunk) else None
            self.chunks_requested += 1
        return self._queue.popleft()

    @property
    def queued(self) -> int:
        return len(self._queue)
