"""Parallel episodes: spawn-started worker processes, one torch/BLAS thread each, results in job order.

Why processes: MuJoCo stepping and Mesa's software renderer are single-threaded C code, so the
only way to use both cores is one simulator per process. Why "spawn": a forked child inherits the
parent's OpenMP/torch thread pools and any GL state in a broken state; spawned ones start clean.
Why one thread each: with two busy processes on two cores, torch's spinning OpenMP threads make a
small model 10-250x slower (ENVIRONMENT.md).

Why never in the caller's process, even with one worker: Mesa's software renderer loads its own
LLVM (libLLVM-15), and importing `triton` (which torch pulls in lazily) after that segfaults on the
clashing LLVM symbols; in the other order both work. So every simulator lives in a spawned worker
that imports triton (when installed) before its first GL context, and the caller (a CLI, pytest, a
training loop) never loads Mesa at all.
"""
from __future__ import annotations

import atexit
import collections
import os
import sys
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Sequence

_ENV_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_ENV_CACHE_SIZE = 3  # jobs arrive grouped by task; a few cached envs avoid reloading MuJoCo models


def init_worker() -> None:
    """Runs first in every worker process, before any GL context exists."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401  (must precede Mesa's LLVM; see the module docstring)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    from .env import set_gl_backend

    set_gl_backend()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    # MetaWorld's experts warn on every action they clip; the clipping is intended.
    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")


def get_env(task: str, cameras: Sequence[str], image_size: int):
    """A cached MetaWorldEnv for this process (least recently used ones are closed)."""
    from .env import MetaWorldEnv

    key = (task, tuple(cameras), int(image_size))
    if key in _ENV_CACHE:
        _ENV_CACHE.move_to_end(key)
        return _ENV_CACHE[key]
    while len(_ENV_CACHE) >= _ENV_CACHE_SIZE:
        _ENV_CACHE.popitem(last=False)[1].close()
    first = not _ENV_CACHE
    env = _ENV_CACHE[key] = MetaWorldEnv(task, cameras, image_size)
    if first:
        # Free GL contexts at exit before MuJoCo's own exit hook (registered when the first renderer
        # was made, so it runs after this one) terminates the EGL display; else EGL prints errors.
        atexit.register(close_envs)
    return env


def close_envs() -> None:
    while _ENV_CACHE:
        _ENV_CACHE.popitem(last=False)[1].close()


def run_jobs(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    workers: int,
    desc: str = "episodes",
    progress: bool = True,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Yield `fn(job)` for every job, in job order, computed by `workers` spawned processes.

    At most 2 * workers + 2 results wait in memory, so a slow consumer (the dataset writer) bounds
    the memory of fast producers. An exception in any job stops the pool (pending jobs are
    cancelled) and is re-raised here with its message intact.
    """
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, received {workers}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="ep", disable=not progress, dynamic_ncols=True)
    try:
        yield from _run_pool(fn, jobs, workers, bar, initializer, initargs)
    finally:
        bar.close()


def _worker_start(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    init_worker()
    if initializer is not None:
        initializer(*initargs)


def _run_pool(fn, jobs: Iterable[Any], workers: int, bar, initializer, initargs) -> Iterator[Any]:
    import multiprocessing as mp

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_start,
        initargs=(initializer, initargs),
    )
    window: collections.deque[Future] = collections.deque()
    try:
        for job in jobs:
            window.append(pool.submit(fn, job))
            if len(window) > 2 * workers + 2:
                yield _result(window.popleft())
                bar.update(1)
        while window:
            yield _result(window.popleft())
            bar.update(1)
    finally:
        for fut in window:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(fut: Future) -> Any:
    try:
        return fut.result()
    except BrokenProcessPool as e:
        raise RuntimeError(
            f"a MetaWorld worker process died ({e}): a crash in MuJoCo, the GL renderer or the policy's "
            "native code (a Python exception would have been reported with its message)"
        ) from e
