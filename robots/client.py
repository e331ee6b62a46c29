"""The light client of `vla serve`, for the robot computer: numpy, msgpack and websockets only.

    from robots.client import PolicyClient

    with PolicyClient("ws://gpu-box:8765", adapter="so100") as client:
        print(client.metadata["adapters"]["so100"])      # cameras, state_dim, action_dim, chunk_size
        reply = client.infer({"observation.state": state, "observation.images.top": rgb_hwc_uint8,
                              "task": "pick up the cube"})
        reply.actions        # (H, A) float32, unnormalized: the robot's own units
        reply.timing         # the server's decode/queue/infer/total milliseconds
        reply.latency_ms     # observation sent -> actions received, as this computer saw it

A refused request raises `ServerError` with the server's reason (``code``: bad_observation,
unknown_adapter, ...); the connection stays usable. It imports neither torch nor ``vla``, so it
installs on a small robot computer with ``pip install numpy msgpack websockets``.
"""
from __future__ import annotations

import itertools
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from robots import protocol as P


class ServerError(RuntimeError):
    """The server answered a request with an error: ``code`` (see robots/protocol.py) and its reason."""

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(f"policy server refused the request ({code}): {message}")
        self.code, self.reason, self.request_id = code, message, request_id


@dataclass
class InferReply:
    actions: np.ndarray  # (H, A) (or (N, H, A) when num_samples > 1 and no selector), float32
    adapter: str
    timing: dict[str, float] = field(default_factory=dict)  # the server's, in milliseconds
    scores: np.ndarray | None = None  # (1, N) candidate scores when a selector chose the chunk
    latency_ms: float = 0.0  # round trip measured here: request encoded and sent -> reply decoded


class PolicyClient:
    """A synchronous connection to a policy server (one request at a time per connection; open one
    client per thread for parallel requests)."""

    def __init__(self, url: str, adapter: str | None = None, *, open_timeout: float = 10.0,
                 timeout: float | None = 30.0, max_message_bytes: int = 64 << 20) -> None:
        from websockets.sync.client import connect

        self.url, self.adapter, self.timeout = url, adapter, timeout
        # compression=None: deflating images costs more time than it saves on a LAN (and the server
        # does not offer it).
        # __enter__: websockets >= 17.1 wants connect() entered; older versions return the connection itself.
        self._ws = connect(url, open_timeout=open_timeout, max_size=max_message_bytes, compression=None).__enter__()
        self._ids = itertools.count(1)
        try:
            hello = P.unpackb(self._ws.recv(timeout=open_timeout))
            if hello.get("type") != P.HELLO:
                raise P.ProtocolError(f"expected a hello message first, received {hello.get('type')!r}")
            if hello.get("protocol") != P.PROTOCOL_VERSION:
                raise P.ProtocolError(f"server speaks protocol {hello.get('protocol')!r}, "
                                      f"this client {P.PROTOCOL_VERSION}")
        except BaseException:
            self._ws.close()
            raise
        self.metadata: dict[str, Any] = hello
        if adapter is not None and adapter not in hello.get("adapters", {}):
            self._ws.close()
            raise ServerError(P.ERR_UNKNOWN_ADAPTER, f"unknown adapter {adapter!r}; the server has "
                                                     f"{sorted(hello.get('adapters', {}))}")

    def adapter_metadata(self, adapter: str | None = None) -> dict[str, Any]:
        """Cameras, state/action dims and chunking of ``adapter`` (default: this client's, else the server's)."""
        name = adapter or self.adapter or self.metadata["default_adapter"]
        return self.metadata["adapters"][name]

    def _request(self, message: dict[str, Any], timeout: float | None) -> tuple[dict[str, Any], float]:
        rid = next(self._ids)
        message = {**message, "id": rid}
        limit = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        self._ws.send(P.packb(message))
        while True:
            left = None if limit is None else max(0.0, limit - (time.perf_counter() - t0))
            reply = P.unpackb(self._ws.recv(timeout=left))  # TimeoutError when the server is too slow
            got = reply.get("id")
            if isinstance(got, int) and got < rid:
                continue  # the late reply to a request that timed out earlier: nobody waits for it now
            break
        latency = (time.perf_counter() - t0) * 1e3
        if reply.get("type") == P.ERROR:
            raise ServerError(str(reply.get("code")), str(reply.get("message")), got)
        if got != rid:
            raise P.ProtocolError(f"reply id {got!r} does not match request id {rid}")
        return reply, latency

    def infer(self, obs: Mapping[str, Any], *, adapter: str | None = None, num_samples: int | None = None,
              selector: str | None = None, seed: int | None = None, inpaint: Any = None,
              inpaint_weights: Any = None, reference: Any = None, reference_start: int | None = None,
              timeout: float | None = None) -> InferReply:
        """Send one observation (LeRobot keys: ``observation.state`` (S,), ``observation.images.<cam>``
        (H, W, 3) uint8, ``task`` str) and return the action chunk. ``inpaint`` (H', A) committed
        actions (+ ``inpaint_weights`` (H',)): real-time chunking (flow heads, docs/serving.md).
        ``reference`` (H', A): the current plan for the chunk's ticks from ``reference_start`` (default 0) on
        (``coherence`` selector)."""
        msg: dict[str, Any] = {"type": P.INFER, "obs": {k: _plain(v) for k, v in obs.items()}}
        if adapter or self.adapter:
            msg["adapter"] = adapter or self.adapter
        for key, value in (("num_samples", num_samples), ("selector", selector), ("seed", seed),
                           ("reference_start", reference_start)):
            if value is not None:
                msg[key] = value
        for key, value in (("inpaint", inpaint), ("inpaint_weights", inpaint_weights), ("reference", reference)):
            if value is not None:
                msg[key] = np.asarray(value, dtype=np.float32)
        reply, latency = self._request(msg, timeout)
        actions = reply.get("actions")
        if not isinstance(actions, np.ndarray) or actions.ndim < 2 or not np.isfinite(actions).all():
            # The server checks this too; a robot must never receive NaN, whoever is at fault.
            raise P.ProtocolError(f"server sent unusable actions: {type(actions).__name__} "
                                  f"{getattr(actions, 'shape', '')}")
        return InferReply(actions=actions, adapter=str(reply.get("adapter")), timing=dict(reply.get("timing", {})),
                          scores=reply.get("scores"), latency_ms=latency)

    def ping(self, timeout: float | None = None) -> float:
        """Round trip of an empty message, in milliseconds (the network + server loop, no inference)."""
        return self._request({"type": P.PING}, timeout)[1]

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    # Lists of numbers (a state typed by hand) travel as arrays; strings (the task) as strings.
    if isinstance(value, (list, tuple)) and value and not all(isinstance(v, str) for v in value):
        return np.asarray(value)
    return value


def health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /healthz`` of the server at ``url`` (``ws://host:port`` or ``http://host:port``) -> its JSON."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    with urllib.request.urlopen(urlunsplit((scheme, parts.netloc, "/healthz", "", "")), timeout=timeout) as r:
        return json.loads(r.read().decode())
