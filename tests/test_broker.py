"""The chunk broker hands out one action per tick and re-plans every n_action_steps."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from policies.broker import ChunkBroker


class CountingPolicy:
    """Returns chunk k filled with k + step/10, so every handed-out action is identifiable."""

    def __init__(self, chunk_size: int = 4, n_action_steps: int = 2, bad: str | None = None) -> None:
        self.config = SimpleNamespace(chunk_size=chunk_size, n_action_steps=n_action_steps)
        self.calls, self.resets, self.bad = 0, 0, bad

    def predict_action_chunk(self, raw):
        self.calls += 1
        if self.bad == "nan":
            return np.full((self.config.chunk_size, 2), np.nan)
        if self.bad == "shape":
            return np.zeros(2)
        return np.array([[self.calls + i / 10] * 2 for i in range(self.config.chunk_size)])

    def reset(self) -> None:
        self.resets += 1


def test_executes_n_action_steps_then_replans() -> None:
    policy = CountingPolicy(chunk_size=4, n_action_steps=3)
    broker = ChunkBroker(policy)
    got = [broker.act({})[0] for _ in range(7)]
    assert np.allclose(got, [1.0, 1.1, 1.2, 2.0, 2.1, 2.2, 3.0])
    assert policy.calls == 3
    broker.reset()
    assert broker.queued == 0 and policy.resets == 1
    assert broker.act({})[0] == pytest.approx(4.0)


def test_override_and_validation() -> None:
    assert ChunkBroker(CountingPolicy(), n_action_steps=4).n_action_steps == 4
    with pytest.raises(ValueError, match="n_action_steps"):
        ChunkBroker(CountingPolicy(chunk_size=4), n_action_steps=5)
    with pytest.raises(FloatingPointError, match="non-finite"):
        ChunkBroker(CountingPolicy(bad="nan")).act({})
    with pytest.raises(ValueError, match=r"\(H, A\)"):
        ChunkBroker(CountingPolicy(bad="shape")).act({})


class PlanRecordingPolicy(CountingPolicy):
    """With a selector, records the reference (the previous chunk's not-executed actions) of each call."""

    def __init__(self) -> None:
        super().__init__(chunk_size=4, n_action_steps=3)
        self.references: list = []

    def predict_action_chunk(self, raw, num_samples=1, selector=None, reference=None):
        assert (num_samples, selector) == (2, "coherence")
        self.references.append(reference)
        return super().predict_action_chunk(raw)


def test_selector_gets_the_previous_plan_as_reference() -> None:
    policy = PlanRecordingPolicy()
    broker = ChunkBroker(policy, num_samples=2, selector="coherence")
    for _ in range(7):
        broker.act({})
    first, second, third = policy.references
    assert first is None  # nothing planned before the first chunk
    assert np.allclose(second, [[1.3, 1.3]]) and np.allclose(third, [[2.3, 2.3]])  # step 3 of chunks 1 and 2
    broker.reset()
    broker.act({})
    assert policy.references[-1] is None  # a new episode has no plan


def test_policies_without_a_reference_keyword_still_select() -> None:
    """Policies written before `reference=` existed keep working with a selector: it is not sent to them."""

    class OldPolicy(CountingPolicy):
        def predict_action_chunk(self, raw, num_samples=1, selector=None):
            return super().predict_action_chunk(raw)

    broker = ChunkBroker(OldPolicy(), num_samples=2, selector="consistency")
    assert [round(float(broker.act({})[0]), 1) for _ in range(5)] == [1.0, 1.1, 2.0, 2.1, 3.0]
