"""`vla serve`: a policy behind a websocket, for robots driven from another computer or process.

    vla serve --policy runs/base/pretrained_model --adapter so100=runs/so100/.../pretrained_model \\
              --adapter koch=runs/koch/.../pretrained_model --port 8765

Frames are msgpack maps with numpy arrays (robots/protocol.py; the protocol is in docs/serving.md).
A client sends ``{"type": "infer", "obs": {...}, "adapter": "so100"}`` and gets the action chunk
with the server's own timing. ``GET /healthz`` on the same port answers JSON for load balancers
and humans.

Robustness is the point of the design: a malformed frame, a wrong shape, a NaN in an observation,
an unknown adapter or a failing policy gets an ``error`` reply with the reason and the server keeps
serving; a client that disconnects mid-request costs nothing but the wasted inference.

Concurrency: the asyncio loop does networking and (cheap) decoding; inference runs on ONE worker
thread, so requests from many clients queue in arrival order while the loop keeps answering pings,
health checks and bad requests. One thread because torch already uses every core inside a forward
pass, and because adapter switching must not interleave (the registry's lock makes sure anyway).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Iterator

import numpy as np

from robots import protocol as P

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
MAX_SAMPLES = 256  # num_samples above this is a typo, not a request (each sample is a head pass)


class RequestError(Exception):
    """A request the server refuses; becomes an ``error`` reply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PolicyServer:
    """Serves an `robots.adapters.AdapterRegistry` over websockets.

    ``with PolicyServer(registry, port=0).running() as url:`` serves from a background thread (tests,
    benchmarks, a robot process that hosts its own policy); `serve_forever` is the CLI's form.
    """

    def __init__(self, registry: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 max_message_bytes: int = 64 << 20, max_pending: int = 32) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, received {max_pending}")
        self.registry = registry
        self.host, self.port = host, port
        self.max_message_bytes, self.max_pending = max_message_bytes, max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vla-infer")
        self._pending = 0
        self._connections = 0
        self._started = time.time()
        self.counts: Counter[str] = Counter()  # "ok" and one entry per error code
        self.abandoned = 0  # replies that could not be delivered: the client had disconnected
        self._infer_ms: deque[float] = deque(maxlen=1000)
        params = inspect.signature(registry.policy.predict_action_chunk).parameters
        self._supports = {k: k in params for k in ("num_samples", "selector", "generator", "inpaint", "reference",
                                                   "reference_start")}
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ----- messages -----------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {"type": P.HELLO, "protocol": P.PROTOCOL_VERSION, "server": "vla-forge",
                "default_adapter": self.registry.default,
                "adapters": {n: self.registry.metadata(n) for n in self.registry.names},
                "supports": {"num_samples": self._supports["num_samples"], "selector": self._supports["selector"],
                             "seed": self._supports["generator"], "inpaint": self._supports["inpaint"],
                             "reference": self._supports["reference"],
                             "reference_start": self._supports["reference_start"]}}

    def health(self) -> dict[str, Any]:
        ms = sorted(self._infer_ms)
        return {"status": "ok", "protocol": P.PROTOCOL_VERSION, "adapters": self.registry.names,
                "default_adapter": self.registry.default, "uptime_s": round(time.time() - self._started, 1),
                "connections": self._connections, "pending": self._pending, "served": self.counts["ok"],
                "errors": {k: v for k, v in self.counts.items() if k != "ok"}, "abandoned": self.abandoned,
                "adapter_switches": self.registry.switches,
                "infer_ms_p50": round(ms[len(ms) // 2], 2) if ms else None}

    async def _reply(self, frame: Any) -> dict[str, Any]:
        """One request frame -> its reply message. Never raises (the connection must survive)."""
        t0 = time.perf_counter()
        rid = None
        timing: dict[str, float] = {}
        try:
            try:
                msg = P.unpackb(frame)
            except P.ProtocolError as e:
                raise RequestError(P.ERR_MALFORMED, str(e)) from e
            rid = msg.get("id")
            if not isinstance(rid, (int, str)) or isinstance(rid, bool):
                rid = None  # echo only plain ids; anything else is dropped rather than reflected
            kind = msg.get("type")
            if kind == P.PING:
                return {"type": P.PONG, "id": rid, "timing": {"total_ms": _ms(t0)}}
            if kind == P.METADATA:
                return {**self.hello(), "id": rid}
            if kind != P.INFER:
                raise RequestError(P.ERR_BAD_REQUEST, f"type: unknown message type {kind!r}; "
                                                      f"expected one of {[P.INFER, P.PING, P.METADATA]}")
            adapter, obs, kwargs = self._parse_infer(msg)
            timing["decode_ms"] = _ms(t0)
            if self._pending >= self.max_pending:
                raise RequestError(P.ERR_OVERLOADED, f"{self._pending} requests are waiting (max_pending="
                                                     f"{self.max_pending}); retry later")
            self._pending += 1
            try:
                submitted = time.perf_counter()
                chunk, extra, started, ended = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._infer, adapter, obs, kwargs)
            finally:
                self._pending -= 1
            timing.update(queue_ms=round((started - submitted) * 1e3, 3), infer_ms=round((ended - started) * 1e3, 3))
            self._infer_ms.append(timing["infer_ms"])
            timing["total_ms"] = _ms(t0)
            self.counts["ok"] += 1
            return {"type": P.ACTIONS, "id": rid, "adapter": adapter, "actions": chunk, **extra, "timing": timing}
        except RequestError as e:
            self.counts[e.code] += 1
            log.info("request %r refused (%s): %s", rid, e.code, e)
            timing["total_ms"] = _ms(t0)
            return P.error_message(e.code, str(e), rid, timing)
        except Exception as e:  # a bug in the server itself: report it, keep serving
            self.counts[P.ERR_INTERNAL] += 1
            log.exception("request %r failed", rid)
            return P.error_message(P.ERR_INTERNAL, f"{type(e).__name__}: {e}", rid, {"total_ms": _ms(t0)})

    def _parse_infer(self, msg: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        obs = msg.get("obs")
        if not isinstance(obs, dict) or not obs:
            raise RequestError(P.ERR_BAD_REQUEST, f"obs: expected a non-empty map of observation keys, "
                                                  f"received {type(obs).__name__}")
        for k, v in obs.items():
            ok = isinstance(v, (np.ndarray, str)) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
            if not ok:
                raise RequestError(P.ERR_BAD_REQUEST, f"obs[{k!r}]: expected an array or a task string, "
                                                      f"received {type(v).__name__}")
        adapter = msg.get("adapter") or self.registry.default
        if not isinstance(adapter, str):
            raise RequestError(P.ERR_BAD_REQUEST, f"adapter: expected a name, received {type(adapter).__name__}")
        try:
            self.registry.check_name(adapter)
        except KeyError as e:
            raise RequestError(P.ERR_UNKNOWN_ADAPTER, str(e)) from e
        kwargs: dict[str, Any] = {}
        n = msg.get("num_samples")
        if n is not None:
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SAMPLES:
                raise RequestError(P.ERR_BAD_REQUEST, f"num_samples: expected an integer in [1, {MAX_SAMPLES}], "
                                                      f"received {n!r}")
            kwargs["num_samples"] = n
        sel = msg.get("selector")
        if sel is not None:
            if not self._supports["selector"]:
                raise RequestError(P.ERR_UNSUPPORTED, "selector: this server's policy has no selector support "
                                                      "(predict_action_chunk takes no selector)")
            if not isinstance(sel, str):
                raise RequestError(P.ERR_BAD_REQUEST, f"selector: expected a selector name (str), "
                                                      f"received {type(sel).__name__}")
            kwargs["selector"] = sel
        inpaint = msg.get("inpaint")
        if inpaint is not None:
            if not self._supports["inpaint"]:
                raise RequestError(P.ERR_UNSUPPORTED, "inpaint: this server's policy takes no inpaint "
                                                      "(real-time chunking needs predict_action_chunk(inpaint=...))")
            if not isinstance(inpaint, np.ndarray) or inpaint.ndim != 2 or not np.isfinite(inpaint).all():
                raise RequestError(P.ERR_BAD_REQUEST, "inpaint: expected a finite (H', A) array of committed actions, "
                                                      f"received {type(inpaint).__name__} {getattr(inpaint, 'shape', '')}")
            kwargs["inpaint"] = inpaint
            w = msg.get("inpaint_weights")
            if w is not None:
                if not isinstance(w, np.ndarray) or w.shape != inpaint.shape[:1] or not np.isfinite(w).all():
                    raise RequestError(P.ERR_BAD_REQUEST, f"inpaint_weights: expected a finite ({inpaint.shape[0]},) "
                                                          f"array, received {type(w).__name__} {getattr(w, 'shape', '')}")
                kwargs["inpaint_weights"] = w
        reference = msg.get("reference")
        if reference is not None:
            if not self._supports["reference"]:
                raise RequestError(P.ERR_UNSUPPORTED, "reference: this server's policy takes no reference plan "
                                                      "(predict_action_chunk(reference=...))")
            if sel is None:
                raise RequestError(P.ERR_BAD_REQUEST, "reference: the current plan only chooses among candidates; "
                                                      "send a selector (e.g. 'coherence') with num_samples > 1")
            if not isinstance(reference, np.ndarray) or reference.ndim != 2:
                raise RequestError(P.ERR_BAD_REQUEST, "reference: expected a (H', A) array of planned actions, "
                                                      f"received {type(reference).__name__} "
                                                      f"{getattr(reference, 'shape', '')}")
            if not np.isfinite(reference).all():
                raise RequestError(P.ERR_BAD_REQUEST, f"reference: the planned actions {reference.shape} have NaN/inf")
            kwargs["reference"] = reference
            start = msg.get("reference_start")
            if start is not None:
                if not self._supports["reference_start"]:
                    raise RequestError(P.ERR_UNSUPPORTED, "reference_start: this server's policy takes no "
                                                          "reference_start (predict_action_chunk(reference_start=...))")
                if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                    raise RequestError(P.ERR_BAD_REQUEST, f"reference_start: expected a non-negative integer, "
                                                          f"received {start!r}")
                kwargs["reference_start"] = start
        elif msg.get("reference_start") is not None:
            raise RequestError(P.ERR_BAD_REQUEST, "reference_start: only with a reference")
        seed = msg.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise RequestError(P.ERR_BAD_REQUEST, f"seed: expected a non-negative integer, received {seed!r}")
            kwargs["seed"] = seed
        return adapter, obs, kwargs

    def _infer(self, adapter: str, obs: dict[str, Any], kwargs: dict[str, Any]) -> tuple[np.ndarray, dict, float, float]:
        """On the inference thread: validate against the adapter's preprocessor, then predict."""
        started = time.perf_counter()
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            import torch

            kwargs["generator"] = torch.Generator().manual_seed(seed)
        with self.registry.lock:
            policy = self.registry.activate(adapter)
            if policy.preprocessor is None:
                raise RequestError(P.ERR_INTERNAL, f"adapter {adapter!r} has no preprocessor (normalization stats)")
            try:
                # The policy's own input checks (keys, shapes, dtype, range, NaN), run first so that a bad
                # observation is reported as such and not as a policy failure. Costs one preprocessing
                # pass (~1 ms for a 128 px image), small next to inference.
                policy.preprocessor.observation(obs, train=False)
            except (KeyError, ValueError, TypeError) as e:
                raise RequestError(P.ERR_BAD_OBSERVATION, _text(e)) from e
            try:
                chunk = np.asarray(policy.predict_action_chunk(obs, **kwargs))
                scores = getattr(policy, "last_scores", None) if "selector" in kwargs else None
            except KeyError as e:  # e.g. an unknown selector name (the registry lists the known ones)
                raise RequestError(P.ERR_BAD_REQUEST, _text(e)) from e
            except Exception as e:
                log.exception("policy %r failed", adapter)
                raise RequestError(P.ERR_INTERNAL, f"the policy raised {type(e).__name__}: {_text(e)}") from e
        if chunk.dtype.kind != "f" or not np.isfinite(chunk).all():
            raise RequestError(P.ERR_INTERNAL, f"the policy produced a non-finite chunk of shape {chunk.shape}; "
                                               "refusing to send it")
        extra = {} if scores is None else {"scores": _numpy(scores)}
        return chunk.astype(np.float32), extra, started, time.perf_counter()

    # ----- transport ----------------------------------------------------------------------------
    async def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self._connections += 1
        peer = getattr(ws, "remote_address", None)
        try:
            await ws.send(P.packb(self.hello()))
            async for frame in ws:
                reply = await self._reply(frame)
                try:
                    data = P.packb(reply)
                except Exception as e:  # e.g. a policy returned something msgpack cannot carry
                    self.counts[P.ERR_INTERNAL] += 1
                    data = P.packb(P.error_message(P.ERR_INTERNAL, f"could not encode the reply: {e}", reply.get("id")))
                try:
                    await ws.send(data)
                except ConnectionClosed:
                    self.abandoned += 1  # the client left while its request was being served
                    raise
        except ConnectionClosed as e:
            log.info("client %s went away (%s)", peer, e)
        finally:
            self._connections -= 1

    def _process_request(self, connection: Any, request: Any) -> Any:
        """``GET /healthz`` is answered over plain HTTP before any websocket handshake."""
        if request.path.split("?", 1)[0] == "/healthz":
            response = connection.respond(HTTPStatus.OK, json.dumps(self.health()) + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    async def serve_forever(self, ready: threading.Event | None = None) -> None:
        from websockets.asyncio.server import serve

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        # compression=None: deflating camera frames costs more CPU time than the bytes it saves on a LAN.
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         max_size=self.max_message_bytes, compression=None, ping_interval=20,
                         ping_timeout=60) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving %s on ws://%s:%d (adapters: %s)", type(self.registry.policy).__name__, self.host,
                     self.port, ", ".join(self.registry.names))
            if ready is not None:
                ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", None) else self.host
        return f"ws://{host}:{self.port}"

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """Serve from a background thread; yields the ``ws://`` URL (``port=0`` picks a free port)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.serve_forever(ready))
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                errors.append(e)
                ready.set()

        thread = threading.Thread(target=run, name="vla-serve", daemon=True)
        thread.start()
        ready.wait(30)
        if errors:
            raise RuntimeError(f"the policy server failed to start: {errors[0]}") from errors[0]
        try:
            yield self.url
        finally:
            self.stop()
            thread.join(30)
            self._executor.shutdown(wait=False, cancel_futures=True)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _text(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# ----- command line -------------------------------------------------------------------------------
def parse_adapters(items: list[str]) -> dict[str, str]:
    """``["so100=PATH", ...]`` -> {"so100": "PATH"}; a malformed or repeated item is an error."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter: expected NAME=PATH, received {item!r}")
        if name in out:
            raise ValueError(f"--adapter: {name!r} given twice")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vla serve", description="Serve a policy (and LoRA adapters) over websockets.")
    ap.add_argument("--policy", required=True, help="base policy checkpoint (or one adapter checkpoint)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="a LoRA adapter checkpoint trained on the base; repeat for several embodiments")
    ap.add_argument("--default_adapter", default=None, help="adapter for requests that name none (default: base)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 to accept other computers")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--max_pending", type=int, default=32, help="queued requests before 'overloaded' replies")
    ap.add_argument("--max_message_mb", type=float, default=64.0)
    ap.epilog = "Any --policy.FIELD=VALUE overrides the base checkpoint's config (e.g. --policy.head.num_steps=5)."
    args, extra = ap.parse_known_args(argv)
    from vla.config import policy_overrides

    try:
        adapters = parse_adapters(args.adapter)
        overrides = policy_overrides(extra)
    except ValueError as e:
        ap.error(str(e))
    import torch

    from robots.adapters import AdapterRegistry

    if args.threads:
        torch.set_num_threads(args.threads)
    registry = AdapterRegistry.load(args.policy, adapters, device=args.device, overrides=overrides)
    if args.default_adapter is not None:
        registry.default = registry.check_name(args.default_adapter)
    server = PolicyServer(registry, args.host, args.port, max_pending=args.max_pending,
                          max_message_bytes=int(args.max_message_mb * (1 << 20)))
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        log.info("stopped")
    return 0
