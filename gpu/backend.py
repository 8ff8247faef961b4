"""Choose the array module (NumPy or CuPy) and the matching FFT functions.

Everything in ``gpu/`` takes ``xp`` (the array module) as an argument or infers it from its
input with :func:`array_module`, so one code path runs on the CPU and on the GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver errors on machines without a GPU
        return False


def get_xp(device: str = "auto", gpu_id: int | None = None) -> ModuleType:
    """``device``: "cpu" -> numpy; "gpu" -> cupy (error if none); "auto" -> cupy when present."""
    if device == "cpu" or (device == "auto" and not gpu_available()):
        return np
    if not gpu_available():
        raise RuntimeError("device=gpu requested but CuPy sees no CUDA device")
    import cupy

    if gpu_id is not None:
        cupy.cuda.Device(gpu_id).use()
    return cupy


def array_module(a: Any) -> ModuleType:
    """numpy or cupy, whichever owns ``a``."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def is_gpu(xp: ModuleType) -> bool:
    return xp.__name__ == "cupy"


def to_numpy(a: Any) -> np.ndarray:
    """Host copy (no copy for NumPy input)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


_THREADS = {"n": 0}


def set_threads(n: int) -> None:
    """CPU FFT threads (scipy.fft ``workers``); 0 = all cores."""
    _THREADS["n"] = int(n)


def cpu_threads() -> int:
    """Threads this worker's CPU work may use (:func:`set_threads`; 1 inside a :func:`map_chunks` chunk)."""
    return _workers()


def _workers() -> int:
    if threading.current_thread().name.startswith("lmc-xp"):
        return 1  # inside a map_chunks chunk: the chunks already use every thread
    return _THREADS["n"] or (os.cpu_count() or 1)


_POOL: dict[int, ThreadPoolExecutor] = {}
_BLAS_LIMITED: list[bool] = []


def limit_blas_threads() -> None:
    """Make BLAS single-threaded in this process (once).

    The engine's parallelism is explicit (:func:`map_chunks`, scipy.fft ``workers``); OpenBLAS's
    own threads spin-wait between calls and took the cores from the chunk threads: the
    per-particle stage ran 2.3x slower with them (benchmarks/local_speed.py, CPU-2).
    """
    if not _BLAS_LIMITED:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        _BLAS_LIMITED.append(True)


def map_chunks(fn: Callable[[slice], T], n: int, chunk: int, xp: ModuleType = np) -> list[T]:
    """``[fn(slice(i, i + chunk)) for i in range(0, n, chunk)]``, run on the CPU threads.

    NumPy releases the GIL inside its array loops, so independent chunks of one batched operation
    (particle chunks of a likelihood, frame chunks of a transform) use every core the worker owns
    (:func:`set_threads`). On the GPU (``xp`` = cupy) the chunks run in order on the one stream.
    Results come back in chunk order. A call from inside a chunk runs serially (no nested pools).
    """
    slices = [slice(i, min(n, i + chunk)) for i in range(0, n, max(1, chunk))]
    if not is_gpu(xp):
        limit_blas_threads()
    workers = _workers()
    nested = threading.current_thread().name.startswith("lmc-xp")
    if is_gpu(xp) or workers < 2 or len(slices) < 2 or nested:
        return [fn(sl) for sl in slices]
    pool = _POOL.get(workers)
    if pool is None:
        pool = _POOL.setdefault(workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmc-xp"))
    return list(pool.map(fn, slices))


def fft_module(xp: ModuleType) -> Any:
    """``scipy.fft`` on CPU (keeps float32/complex64), ``cupyx.scipy.fft`` on GPU."""
    if is_gpu(xp):
        import cupyx.scipy.fft as cfft

        return cfft
    import scipy.fft as sfft

    return sfft


def rfft2(a: Any) -> Any:
    """Real-to-complex 2-D FFT over the last two axes; float32 in -> complex64 out."""
    xp = array_module(a)
    if is_gpu(xp):
        return fft_module(xp).rfft2(a, axes=(-2, -1))
    return fft_module(xp).rfft2(a, axes=(-2, -1), workers=_workers())


def irfft2(a: Any, s: tuple[int, int]) -> Any:
    """Inverse of :func:`rfft2`; ``s`` = (h, w) of the real output."""
    xp = array_module(a)
    if is_gpu(xp):
        return fft_module(xp).irfft2(a, s=s, axes=(-2, -1))
    return fft_module(xp).irfft2(a, s=s, axes=(-2, -1), workers=_workers())


def fft2(a: Any) -> Any:
    xp = array_module(a)
    if is_gpu(xp):
        return fft_module(xp).fft2(a, axes=(-2, -1))
    return fft_module(xp).fft2(a, axes=(-2, -1), workers=_workers())


def ifft2(a: Any) -> Any:
    xp = array_module(a)
    if is_gpu(xp):
        return fft_module(xp).ifft2(a, axes=(-2, -1))
    return fft_module(xp).ifft2(a, axes=(-2, -1), workers=_workers())


def rfft(a: Any, axis: int = -1) -> Any:
    """Real-to-complex 1-D FFT along ``axis``; float32 in -> complex64 out."""
    xp = array_module(a)
    if is_gpu(xp):
        return fft_module(xp).rfft(a, axis=axis)
    return fft_module(xp).rfft(a, axis=axis, workers=_workers())


def fft(a: Any, axis: int = -1, overwrite_x: bool = False) -> Any:
    """Complex 1-D FFT along ``axis`` (complex64 stays complex64). ``overwrite_x``: the input may be reused."""
    xp = array_module(a)
    if is_gpu(xp):
        return fft_module(xp).fft(a, axis=axis, overwrite_x=overwrite_x)
    return fft_module(xp).fft(a, axis=axis, overwrite_x=overwrite_x, workers=_workers())
