"""The job handler of a worker: one job (a dict from the dispatcher) in, one ``MovieResult`` out.

:class:`PipelineHandler` runs ``streamer.pipeline.process_movie`` with the job's configuration
(the session's processing settings, this machine's compute settings) and decodes the next movie
ahead while the current one is processed. The transport around it (sockets, heartbeats,
reconnection) is ``streamer.live.worker``; tests and diagnostics swap in another handler with
``--handler module:function`` (:func:`load_handler`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

from streamer.config import Config
from streamer.types import MovieResult

Handler = Callable[[dict[str, Any]], MovieResult]

COMPUTE_FIELDS = ("device", "threads", "gpus", "workers")


def job_config(remote: dict[str, Any], local: Config | None = None) -> Config:
    """The session's processing configuration with this machine's compute settings."""
    from streamer.config import from_dict

    # no output folder: a worker writes no files (its plot travels with the result to the writer)
    data = {k: v for k, v in remote.items() if k not in COMPUTE_FIELDS and k != "out"}
    cfg = from_dict(data)
    local = local or Config()
    return cfg.with_(**{k: getattr(local, k) for k in COMPUTE_FIELDS})


class PipelineHandler:
    """The real job handler: ``streamer.pipeline.process_movie`` with the job's configuration.

    ``prefetch(job)`` starts reading and decoding the next movie in a background thread while the
    current one is processed (decode is CPU work — LZW, EER, bz2 — that overlaps the GPU stages);
    the decoded frames are handed to ``process_movie`` when that job comes. The worker calls
    ``prefetch(next job)`` right before ``handler(current job)``, so the current job's own decode
    (prefetched during the previous job) must survive that call: ``_ahead`` keeps the current
    job's entry and the newest prefetch; any other entry is stale (its job was cancelled or
    reordered) and is dropped. A worker therefore holds the movie being processed plus one
    native-dtype movie decoded ahead. ``prefetch_hits`` counts jobs that got their frames ahead.
    ``workspace`` keeps the float32 movie buffers from one job to the next (``streamer.pipeline.Workspace``).
    """

    def __init__(self, local: Config | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.local = local
        self._cfgs: dict[str, Config] = {}
        self._xp: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmc-prefetch")
        self._ahead: dict[str, Any] = {}  # movie -> Future[Movie], oldest first
        self.prefetch_hits = 0
        from streamer.pipeline import Workspace

        self.workspace = Workspace()  # the float32 and binned movie buffers, kept between jobs

    def _config(self, job: dict[str, Any]) -> Config:
        key = json.dumps(job["config"], sort_keys=True)
        cfg = self._cfgs.get(key)
        if cfg is None:
            self._cfgs.clear()
            cfg = self._cfgs[key] = job_config(job["config"], self.local)
        return cfg

    def _decode_threads(self, cfg: Config) -> int:
        """Threads for the decode ahead: all of the worker's beside a GPU; half of them on a CPU
        worker, whose compute keeps its cores busy meanwhile (the decode still finishes well
        within one movie's processing, with less switching between the two)."""
        from gpu.backend import is_gpu

        if cfg.device == "gpu" or (self._xp is not None and is_gpu(self._xp)):
            return cfg.threads
        return max(1, (cfg.threads or os.cpu_count() or 1) // 2)

    def prefetch(self, job: dict[str, Any]) -> None:
        from streamer.formats.movies import read_movie

        movie = job["movie"]
        if movie in self._ahead:
            return
        cfg = self._config(job)
        # at most two: the job about to run (decoded during the previous one) and this one
        while len(self._ahead) >= 2:
            self._ahead.pop(next(iter(self._ahead))).cancel()
        self._ahead[movie] = self._pool.submit(read_movie, movie, cfg.eer, self._decode_threads(cfg))

    def __call__(self, job: dict[str, Any]) -> MovieResult:
        from gpu.backend import get_xp
        from streamer.pipeline import process_movie

        cfg = self._config(job)
        if self._xp is None:
            self._xp = get_xp(cfg.device)
        future = self._ahead.pop(job["movie"], None)
        newest = next(reversed(self._ahead), None)
        for movie in [m for m in self._ahead if m != newest]:  # stale: only the next job's decode is kept
            self._ahead.pop(movie).cancel()
        preloaded = None
        if future is not None:
            preloaded = future.result()  # a MovieError raised while decoding surfaces here
            self.prefetch_hits += 1
        return process_movie(cfg, job["movie"], job.get("picks"), xp=self._xp, workspace=self.workspace,
                             preloaded=preloaded, write_sidecars=False, render_plot=True)


def pipeline_handler(local: Config | None = None) -> Handler:
    """The real job handler (see :class:`PipelineHandler`)."""
    return PipelineHandler(local)


def load_handler(spec: str) -> Handler:
    """``package.module:function`` -> the function (a handler for tests and diagnostics)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"handler {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)
