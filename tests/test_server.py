"""Policy server, light client, wire protocol and LoRA adapters per embodiment (robots/server.py & co)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from robots import protocol as P
from robots.adapters import AdapterRegistry
from robots.client import PolicyClient, ServerError, health
from robots.server import PolicyServer, parse_adapters
from vla.policy import VLAPolicy

REPO = Path(__file__).resolve().parents[1]


def _train(out: Path, data: Path, *args: str) -> Path:
    from vla.config import TrainConfig, parse_config
    from vla.presets import get_preset
    from vla.train import train

    return train(parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={out}", f"--dataset.root={data}", "--dataset.synthetic=false", "--batch_size=4",
        "--steps=2", "--save_every=0", "--warmup_steps=1", "--log_every=1", *args]))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A base policy and two LoRA adapters on it for two embodiments with different dims and stats."""
    from vla.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("serve")
    da = make_synthetic_dataset(root / "arm_a", num_episodes=2, episode_len=10)  # state 4, action 3
    db = make_synthetic_dataset(root / "arm_b", num_episodes=2, episode_len=10, state_dim=6, action_dim=4, seed=1)
    base = _train(root / "base", da)
    a = _train(root / "a", da, "--lora.enabled=true", "--lora.r=4", f"--init_from={base}")
    b = _train(root / "b", db, "--lora.enabled=true", "--lora.r=8", f"--init_from={base}")
    return {"base": base, "a": a, "b": b}


@pytest.fixture(scope="module")
def registry(ckpts) -> AdapterRegistry:
    return AdapterRegistry.load(ckpts["base"], {"arm_a": ckpts["a"], "arm_b": ckpts["b"]})


@pytest.fixture(scope="module")
def url(registry):
    with PolicyServer(registry, port=0).running() as u:
        yield u


def _obs(state_dim: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation.images.cam0": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
            "observation.state": rng.standard_normal(state_dim).astype(np.float32), "task": "push the red block"}


# ----- protocol ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int64", "bool"])
def test_protocol_round_trips_arrays(dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    back = P.unpackb(P.packb({"a": arr, "nested": {"b": arr[0]}, "s": "text", "n": np.float32(1.5)}))
    assert back["a"].dtype == arr.dtype and np.array_equal(back["a"], arr) and back["a"].flags.writeable
    assert np.array_equal(back["nested"]["b"], arr[0]) and back["s"] == "text" and back["n"] == 1.5


def test_protocol_refuses_bad_frames() -> None:
    nd = {P.ND_KEY: True, "dtype": "<f4", "shape": [2, 2], "data": b"\0" * 15}
    with pytest.raises(P.ProtocolError, match=r"needs 16 bytes, received 15"):
        P.unpackb(msgpack.packb({"x": nd}))
    with pytest.raises(P.ProtocolError, match="dtype object is not allowed"):
        P.unpackb(msgpack.packb({"x": {**nd, "dtype": "O", "data": b""}}))
    with pytest.raises(P.ProtocolError, match="not valid msgpack"):
        P.unpackb(b"\xc1")
    with pytest.raises(P.ProtocolError, match="expected a msgpack map"):
        P.unpackb(msgpack.packb([1, 2]))
    with pytest.raises(P.ProtocolError, match="text frame"):
        P.unpackb("hello")
    with pytest.raises(TypeError, match="dtype"):
        P.packb({"x": np.array(["a"], dtype=object)})


def test_client_imports_neither_torch_nor_vla() -> None:
    code = ("import sys, robots.client, robots.protocol; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vla', 'robots.base')]; "
            "assert not bad, bad; assert 'robots.base' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_copied_client_files_work_on_their_own(url: str, tmp_path: Path) -> None:
    """The robot computer's install: robots/protocol.py + robots/client.py copied into a folder."""
    import shutil

    (tmp_path / "robots").mkdir()
    for name in ("protocol.py", "client.py"):
        shutil.copy(REPO / "robots" / name, tmp_path / "robots" / name)
    code = ("import sys; sys.path.insert(0, '.'); import numpy as np; from robots.client import PolicyClient; "
            "import robots.client as c; assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "obs = {'observation.images.cam0': np.zeros((24, 24, 3), np.uint8), "
            "'observation.state': np.zeros(4, np.float32), 'task': 'push the red block'}; "
            "r = PolicyClient(sys.argv[2]).infer(obs); assert 'torch' not in sys.modules; print(r.actions.shape)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), url], cwd=tmp_path, check=True, timeout=60,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "(4, 3)"


# ----- serving --------------------------------------------------------------------------------------
def test_round_trip_matches_the_local_policy(url: str, ckpts) -> None:
    with PolicyClient(url) as client:
        meta = client.metadata
        assert meta["protocol"] == P.PROTOCOL_VERSION and meta["default_adapter"] == "base"
        assert meta["adapters"]["arm_b"]["state_dim"] == 6 and meta["adapters"]["arm_b"]["action_dim"] == 4
        reply = client.infer(_obs(), seed=7)
        assert reply.actions.shape == (4, 3) and reply.actions.dtype == np.float32 and reply.adapter == "base"
        assert {"decode_ms", "queue_ms", "infer_ms", "total_ms"} <= set(reply.timing)
        assert 0 < reply.timing["infer_ms"] <= reply.timing["total_ms"] <= reply.latency_ms
        local = VLAPolicy.from_pretrained(ckpts["base"]).predict_action_chunk(
            _obs(), generator=torch.Generator().manual_seed(7))
        np.testing.assert_allclose(reply.actions, local, rtol=1e-5, atol=1e-5)
        assert client.ping() > 0
    h = health(url)
    assert h["status"] == "ok" and set(h["adapters"]) == {"base", "arm_a", "arm_b"} and h["served"] >= 1


def test_samples_and_selector_pass_through(url: str) -> None:
    with PolicyClient(url) as client:
        assert client.infer(_obs(), num_samples=3).actions.shape == (3, 4, 3)
        assert client.metadata["supports"]["selector"], "VLAPolicy.predict_action_chunk takes selector="
        reply = client.infer(_obs(), num_samples=3, selector="first")
        assert reply.actions.shape == (4, 3) and reply.scores is not None and reply.scores.shape[-1] == 3
        with pytest.raises(ServerError, match="selector"):
            client.infer(_obs(), num_samples=3, selector="no-such-selector")
        # Real-time chunking: committed actions (+ weights) travel with the request.
        assert client.metadata["supports"]["inpaint"]
        committed = client.infer(_obs(), seed=1).actions[:2]
        assert client.infer(_obs(), inpaint=committed, inpaint_weights=[1.0, 0.5]).actions.shape == (4, 3)
        with pytest.raises(ServerError, match="inpaint_weights"):
            client.infer(_obs(), inpaint=committed, inpaint_weights=[1.0])
        with pytest.raises(ServerError, match="inpaint"):
            client.infer(_obs(), inpaint=np.zeros(3))
        # The current plan for the coherence selector.
        assert client.metadata["supports"]["reference"]
        assert client.infer(_obs(), num_samples=3, selector="coherence", reference=committed).actions.shape == (4, 3)
        with pytest.raises(ServerError, match=r"reference: expected a \(H', A\) array .* \(3,\)"):
            client.infer(_obs(), num_samples=3, selector="coherence", reference=np.zeros(3))
        with pytest.raises(ServerError, match=r"reference: the planned actions \(2, 3\) have NaN"):
            client.infer(_obs(), num_samples=3, selector="coherence", reference=np.full((2, 3), np.nan))
        with pytest.raises(ServerError, match="reference: .*send a selector"):
            client.infer(_obs(), reference=committed)
        # An asynchronous client's plan starts after the steps that will be late.
        assert client.metadata["supports"]["reference_start"]
        assert client.infer(_obs(), num_samples=3, selector="coherence", reference=committed,
                            reference_start=1).actions.shape == (4, 3)
        with pytest.raises(ServerError, match="reference_start: expected a non-negative integer"):
            client.infer(_obs(), num_samples=3, selector="coherence", reference=committed, reference_start=-1)
        with pytest.raises(ServerError, match=r"reference_start must be an int in \[0, 4\)"):
            client.infer(_obs(), num_samples=3, selector="coherence", reference=committed, reference_start=4)
        with pytest.raises(ServerError, match="reference_start: only with a reference"):
            client.infer(_obs(), num_samples=3, selector="coherence", reference_start=1)


def _raw(client: PolicyClient, frame) -> dict:
    client._ws.send(frame)
    return P.unpackb(client._ws.recv(timeout=30))


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(url: str) -> None:
    nan = _obs()
    nan["observation.state"][1] = np.nan
    with PolicyClient(url) as client:
        cases = [  # (frame, expected code, words the reason must contain)
            (b"\xc1\x00garbage", P.ERR_MALFORMED, "msgpack"),
            ("a text frame", P.ERR_MALFORMED, "text frame"),
            (msgpack.packb([1, 2, 3]), P.ERR_MALFORMED, "map"),
            (msgpack.packb({"type": "infer", "obs": {"x": {P.ND_KEY: True, "dtype": "<f4", "shape": [3],
                                                              "data": b"12"}}}), P.ERR_MALFORMED, "12 bytes"),
            (P.packb({"type": "dance", "id": 1}), P.ERR_BAD_REQUEST, "unknown message type"),
            (P.packb({"type": "infer", "id": 2}), P.ERR_BAD_REQUEST, "obs"),
            (P.packb({"type": "infer", "id": 3, "obs": {"observation.state": {"a": 1}}}), P.ERR_BAD_REQUEST, "obs["),
            (P.packb({"type": "infer", "id": 4, "obs": _obs(), "num_samples": 0}), P.ERR_BAD_REQUEST, "num_samples"),
            (P.packb({"type": "infer", "id": 5, "obs": _obs(state_dim=7)}), P.ERR_BAD_OBSERVATION, "(4,)"),
            (P.packb({"type": "infer", "id": 6, "obs": nan}), P.ERR_BAD_OBSERVATION, "NaN"),
            (P.packb({"type": "infer", "id": 7, "obs": {**_obs(), "observation.images.cam0": np.zeros((24, 24))}}),
             P.ERR_BAD_OBSERVATION, "observation.images.cam0"),
            (P.packb({"type": "infer", "id": 8, "obs": {k: v for k, v in _obs().items() if k != "task"}}),
             P.ERR_BAD_OBSERVATION, "task"),
            (P.packb({"type": "infer", "id": 9, "obs": _obs(), "adapter": "arm_c"}), P.ERR_UNKNOWN_ADAPTER,
             "known adapters: arm_a, arm_b, base"),
            # per-embodiment dims: arm_b's state has 6 values, not the base's 4
            (P.packb({"type": "infer", "id": 10, "obs": _obs(4), "adapter": "arm_b"}), P.ERR_BAD_OBSERVATION, "(6,)"),
        ]
        for frame, code, words in cases:
            reply = _raw(client, frame)
            assert reply["type"] == P.ERROR and reply["code"] == code, (frame[:40], reply)
            assert words in reply["message"], (words, reply["message"])
        with pytest.raises(ServerError, match="unknown_adapter"):
            client.infer(_obs(), adapter="nope")
        # The same connection still serves.
        assert np.isfinite(client.infer(_obs()).actions).all()
    assert health(url)["errors"][P.ERR_BAD_OBSERVATION] >= 5


def test_non_finite_policy_output_is_an_error_not_an_action(registry: AdapterRegistry) -> None:
    server = PolicyServer(registry, port=0)
    policy = registry.policy
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda raw, **kw: np.full((4, 3), np.nan)
    try:
        with server.running() as u, PolicyClient(u) as client:
            with pytest.raises(ServerError, match=r"internal.*non-finite"):
                client.infer(_obs())
    finally:
        del policy.predict_action_chunk
    assert policy.predict_action_chunk.__func__ is original.__func__


def test_client_disconnecting_mid_request_and_overload(registry: AdapterRegistry) -> None:
    policy = registry.policy
    original = policy.predict_action_chunk

    def slow(raw, **kw):
        time.sleep(0.4)
        return original(raw, **kw)

    policy.predict_action_chunk = slow
    server = PolicyServer(registry, port=0, max_pending=1)
    try:
        with server.running() as u:
            from websockets.sync.client import connect

            ws = connect(u, compression=None).__enter__()
            ws.recv(timeout=10)  # hello
            ws.send(P.packb({"type": "infer", "id": 1, "obs": _obs()}))
            time.sleep(0.05)
            ws.close()  # gone while its request is being computed
            deadline = time.time() + 10
            while not health(u)["abandoned"] and time.time() < deadline:  # the abandoned inference finishes
                time.sleep(0.05)
            h = health(u)
            assert h["abandoned"] == 1 and h["pending"] == 0  # computed, then found its client gone
            with PolicyClient(u) as client:
                assert np.isfinite(client.infer(_obs()).actions).all()
                # One request in flight (max_pending=1): a second one is refused at once, not queued.
                results: list = []
                t = threading.Thread(target=lambda: results.append(client.infer(_obs())))
                t.start()
                time.sleep(0.15)
                with PolicyClient(u) as other:
                    with pytest.raises(ServerError) as e:
                        other.infer(_obs())
                    assert e.value.code == P.ERR_OVERLOADED and "retry later" in e.value.reason
                t.join(30)
                assert results and np.isfinite(results[0].actions).all()
            h = health(u)
            assert h["status"] == "ok" and h["served"] >= 2
    finally:
        del policy.predict_action_chunk


def test_eight_concurrent_clients(url: str, registry: AdapterRegistry, ckpts) -> None:
    """Mixed adapters and bad requests from 8 clients at once: every good request gets the action chunk
    of ITS adapter (the registry's lock keeps switches from interleaving), every bad one an error."""
    expected = {name: VLAPolicy.from_pretrained(ckpts[key]).predict_action_chunk(
        _obs(sd), generator=torch.Generator().manual_seed(3)) for name, key, sd in
        [("base", "base", 4), ("arm_a", "a", 4), ("arm_b", "b", 6)]}
    plan = ["base", "arm_a", "arm_b", "bad"] * 2
    failures: list[str] = []

    def run(i: int, kind: str) -> None:
        try:
            with PolicyClient(url) as client:
                for _ in range(3):
                    if kind == "bad":
                        try:
                            client.infer({**_obs(), "observation.state": np.zeros(9, np.float32)})
                            failures.append(f"client {i}: bad request was served")
                        except ServerError as e:
                            if e.code != P.ERR_BAD_OBSERVATION:
                                failures.append(f"client {i}: {e}")
                        continue
                    reply = client.infer(_obs(6 if kind == "arm_b" else 4), adapter=kind, seed=3)
                    if not np.allclose(reply.actions, expected[kind], rtol=1e-5, atol=1e-5):
                        failures.append(f"client {i} ({kind}): wrong actions")
        except Exception as e:  # noqa: BLE001 - collected and reported below
            failures.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert health(url)["connections"] == 0


# ----- adapters -------------------------------------------------------------------------------------
def test_adapters_switch_without_reloading_the_base(registry: AdapterRegistry, ckpts, monkeypatch) -> None:
    backbone = registry.policy.backbone
    weight = dict(backbone.named_parameters())["blocks.0.q_proj.base_layer.weight"]
    ptr, before = weight.data_ptr(), weight.detach().clone()

    def no_reload(*a, **k):
        raise AssertionError("switching adapters must not load a checkpoint")

    monkeypatch.setattr(VLAPolicy, "from_pretrained", no_reload)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    out = {}
    for name, sd in [("arm_a", 4), ("base", 4), ("arm_b", 6), ("arm_a", 4)]:
        t0 = time.perf_counter()
        registry.activate(name)
        assert time.perf_counter() - t0 < 0.5
        out.setdefault(name, []).append(registry.predict(name, _obs(sd), generator=gen()))
    monkeypatch.undo()
    assert not np.allclose(out["arm_a"][0], out["base"][0])  # different adapters, different actions
    assert out["arm_b"][0].shape == (4, 4)  # arm_b's own action dim and stats
    np.testing.assert_array_equal(out["arm_a"][0], out["arm_a"][1])  # switching back is exact
    assert weight.data_ptr() == ptr and torch.equal(weight, before)  # the base was neither copied nor changed
    # Each adapter behaves exactly as if it had been loaded alone (its LoRA, head and normalization stats).
    for name, key, sd in [("arm_a", "a", 4), ("arm_b", "b", 6), ("base", "base", 4)]:
        alone = VLAPolicy.from_pretrained(ckpts[key]).predict_action_chunk(_obs(sd), generator=gen())
        np.testing.assert_allclose(registry.predict(name, _obs(sd), generator=gen()), alone, rtol=1e-5, atol=1e-6)


def test_adapter_registry_errors(registry: AdapterRegistry, ckpts, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.add("arm_a", ckpts["a"])
    with pytest.raises(ValueError, match="letters, digits"):
        registry.add("arm.c", ckpts["a"])
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter checkpoint"):
        registry.add("arm_c", ckpts["base"])
    other = AdapterRegistry(VLAPolicy.from_pretrained(ckpts["base"]), base_path=tmp_path)
    with pytest.raises(ValueError, match="trained on the base checkpoint"):
        other.add("arm_a", ckpts["a"])
    # An adapter checkpoint given as --policy is served as "default" on its base.
    reg = AdapterRegistry.load(ckpts["a"])
    assert reg.names == ["base", "default"] and reg.default == "default"
    assert parse_adapters(["x=/p", "y=/q"]) == {"x": "/p", "y": "/q"}
    for bad in (["x"], ["=p"], ["x=/p", "x=/q"]):
        with pytest.raises(ValueError, match="--adapter"):
            parse_adapters(bad)


def test_vla_serve_command_line(ckpts) -> None:
    """`vla serve` as its users start it: a process with adapters, /healthz, a request, a clean stop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vla.cli", "serve", f"--policy={ckpts['base']}",
                             f"--adapter=arm_b={ckpts['b']}", f"--port={port}", "--threads=1"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"ws://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                assert health(url, timeout=1)["adapters"] == ["base", "arm_b"]
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "vla serve did not start"
                time.sleep(0.2)
        with PolicyClient(url, adapter="arm_b") as client:
            assert client.infer(_obs(6)).actions.shape == (4, 4)
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "vla.cli", "serve", f"--policy={ckpts['base']}", "--adapter=oops"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=PATH" in bad.stderr


def test_a_timed_out_request_does_not_poison_the_connection(registry: AdapterRegistry) -> None:
    policy = registry.policy
    original = policy.predict_action_chunk

    def slow(raw, **kw):
        time.sleep(0.3)
        return original(raw, **kw)

    policy.predict_action_chunk = slow
    try:
        with PolicyServer(registry, port=0).running() as u, PolicyClient(u) as client:
            with pytest.raises(TimeoutError):
                client.infer(_obs(), timeout=0.05)
            # The late reply to the first request arrives first; it is skipped, not returned as this one's.
            reply = client.infer(_obs(4, seed=1), seed=1, timeout=10)
            del policy.predict_action_chunk
            assert np.allclose(reply.actions, client.infer(_obs(4, seed=1), seed=1).actions, atol=1e-6)
    finally:
        policy.__dict__.pop("predict_action_chunk", None)


def test_oversized_frame_closes_only_that_connection(registry: AdapterRegistry) -> None:
    from websockets.exceptions import ConnectionClosed

    with PolicyServer(registry, port=0, max_message_bytes=1 << 20).running() as u:
        with PolicyClient(u) as big:
            huge = {**_obs(), "observation.images.cam0": np.zeros((1024, 1024, 3), np.uint8)}  # 3 MB
            with pytest.raises(ConnectionClosed) as e:
                big.infer(huge)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1009
        with PolicyClient(u) as client:
            assert np.isfinite(client.infer(_obs()).actions).all()
