"""The policy server's wire format: msgpack frames that carry numpy arrays.

Light on purpose: numpy and msgpack only (no torch, no ``vla``), because the robot computer imports
it through `robots.client`. Every frame is one msgpack map. A numpy array is the map

    {"__ndarray__": True, "dtype": "<f4", "shape": [480, 640, 3], "data": <raw bytes, C order>}

and a numpy scalar becomes a plain msgpack number. Decoding validates what a hostile or buggy peer
could send: only bool/int/uint/float dtypes (no pickled objects, no strings-as-arrays), the byte
count must match the shape, and a bad frame raises `ProtocolError` naming the problem instead of
producing an array of garbage. The message types are documented in docs/serving.md.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ND_KEY = "__ndarray__"
# dtype kinds that are plain numbers: bool, signed, unsigned, float. Object/void/str arrays could
# smuggle arbitrary Python objects or unbounded payloads; they are refused.
_ALLOWED_KINDS = "biuf"
MAX_DIMS = 8

# Message types (the "type" field). Client -> server:
INFER, PING, METADATA = "infer", "ping", "metadata"
# Server -> client:
HELLO, ACTIONS, PONG, ERROR = "hello", "actions", "pong", "error"

# Error codes in {"type": "error", "code": ...} replies.
ERR_MALFORMED = "malformed"            # not a msgpack map / undecodable array
ERR_BAD_REQUEST = "bad_request"        # missing or wrongly typed fields, unknown message type
ERR_UNKNOWN_ADAPTER = "unknown_adapter"
ERR_BAD_OBSERVATION = "bad_observation"  # missing camera, wrong shape, NaN, ... (the policy's input checks)
ERR_UNSUPPORTED = "unsupported"        # e.g. a selector on a server whose policy cannot select
ERR_OVERLOADED = "overloaded"          # too many requests waiting; retry later
ERR_INTERNAL = "internal"              # the policy failed (or produced a non-finite chunk)
ERROR_CODES = (ERR_MALFORMED, ERR_BAD_REQUEST, ERR_UNKNOWN_ADAPTER, ERR_BAD_OBSERVATION, ERR_UNSUPPORTED,
               ERR_OVERLOADED, ERR_INTERNAL)


class ProtocolError(ValueError):
    """A frame that does not follow the protocol (the message says what and where)."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"protocol: cannot send an array of dtype {obj.dtype} (only bool/int/uint/float)")
        arr = np.ascontiguousarray(obj)
        return {ND_KEY: True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"protocol: cannot encode an object of type {type(obj).__name__}")


def _decode_array(m: dict) -> np.ndarray:
    try:
        dtype = np.dtype(m["dtype"])
        shape = tuple(int(s) for s in m["shape"])
        data = m["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"array: expected keys dtype (str), shape (list of int), data (bytes); "
                            f"received keys {sorted(map(str, m))} ({type(e).__name__}: {e})") from e
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
        raise ProtocolError(f"array: dtype {dtype} is not allowed; expected bool/int/uint/float")
    if len(shape) > MAX_DIMS or any(s < 0 for s in shape):
        raise ProtocolError(f"array: shape {list(shape)} is invalid; expected at most {MAX_DIMS} non-negative sizes")
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"array: data must be bytes, received {type(data).__name__}")
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != want:
        raise ProtocolError(f"array: shape {list(shape)} of {dtype} needs {want} bytes, received {len(data)}")
    # frombuffer gives a read-only view of the frame; copy so receivers may write into it.
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _object_hook(m: dict) -> Any:
    if m.get(ND_KEY) is True:
        return _decode_array(m)
    return m


def packb(message: dict[str, Any]) -> bytes:
    """Encode one message (a dict whose values may hold numpy arrays) as a msgpack frame."""
    if not isinstance(message, dict):
        raise TypeError(f"protocol: a message must be a dict, received {type(message).__name__}")
    return msgpack.packb(message, default=_encode_default, use_bin_type=True)


def unpackb(frame: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode one frame; anything that is not a msgpack map of the protocol raises `ProtocolError`."""
    if isinstance(frame, str):
        raise ProtocolError("expected a binary msgpack frame, received a text frame")
    try:
        msg = msgpack.unpackb(bytes(frame), object_hook=_object_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types (ExtraData, ValueError, UnpackValueError...)
        raise ProtocolError(f"frame is not valid msgpack ({type(e).__name__}{': ' + str(e) if str(e) else ''})") from e
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a msgpack map (a message), received {type(msg).__name__}")
    return msg


def error_message(code: str, message: str, request_id: Any = None, timing: dict[str, float] | None = None) -> dict:
    """The reply to a request that could not be served: the client raises it with its reason."""
    out: dict[str, Any] = {"type": ERROR, "code": code, "message": message, "id": request_id}
    if timing is not None:
        out["timing"] = timing
    return out
