"""The session's log: ``OUT/logs/lmc.log`` always, and stderr when there is no live console
(local workers log to ``OUT/logs/worker-NAME.log``, see ``streamer.live.local_workers``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class SessionLog:
    """Attaches the session's handlers to the ``lmc`` logger and detaches them again."""

    def __init__(self) -> None:
        self.handlers: list[logging.Handler] = []

    def attach(self, out: Path, to_stderr: bool) -> None:
        logger = logging.getLogger("lmc")
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        (out / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "logs" / "lmc.log")
        fh.setFormatter(fmt)
        self.handlers.append(fh)
        if to_stderr:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(fmt)
            self.handlers.append(sh)
        for h in self.handlers:
            logger.addHandler(h)

    def detach(self) -> None:
        logger = logging.getLogger("lmc")
        for h in self.handlers:
            logger.removeHandler(h)
            h.close()
        self.handlers.clear()
