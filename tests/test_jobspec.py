"""streamer/live/jobspec.py: what is refused before a movie is sent to a worker."""

from __future__ import annotations

import pytest

from streamer.config import from_dict
from streamer.errors import ConfigError
from streamer.live import jobspec

GIB = 2**30


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine has ``n`` GiB (a movie larger than the real memory cannot be written here)."""

    def set_gib(n: float) -> None:
        monkeypatch.setattr(jobspec, "total_memory", lambda: int(n * GIB))

    return set_gib


def _cfg(**extra: object):
    return from_dict({"apix": 1.0, "dose_per_frame": 1.0, "box": 256, **extra})


@pytest.mark.parametrize("name", ["a.mrc", "a.mrc.bz2", "a.tif", "a.tiff"])
def test_frames_larger_than_memory_are_refused_for_every_frame_format(memory, name: str) -> None:
    memory(2.0)
    jobspec.check_fits(_cfg(), name, 30, 4096, 4096)  # 1.9 GiB as float32: fits
    with pytest.raises(ConfigError, match=rf"{name} needs 2\.5 GiB as float32 frames \(40 frames\), more than "
                                          r"this machine's 2\.0 GiB"):
        jobspec.check_fits(_cfg(), name, 40, 4096, 4096)


def test_eer_counts_its_fractions_on_the_upsampled_grid(memory) -> None:
    """1000 raw EER frames become eer.fractions (40) frames of (4096 u)² px: 2.5 GiB at u = 1, 10 GiB at u = 2."""
    memory(8.0)
    jobspec.check_fits(_cfg(), "a.eer", 1000, 4096, 4096)
    with pytest.raises(ConfigError, match=r"a\.eer needs 10\.0 GiB as float32 frames \(40 fractions at eer\.upsampling 2\)"):
        jobspec.check_fits(_cfg(eer={"upsampling": 2}), "a.eer", 1000, 4096, 4096)
    jobspec.check_fits(_cfg(eer={"upsampling": 2, "fractions": 20}), "a.eer", 1000, 4096, 4096)  # 5 GiB
    jobspec.check_fits(_cfg(eer={"fractions": 60}), "a.eer", 50, 4096, 4096)  # fewer raw frames than fractions


def test_unknown_memory_checks_nothing_but_the_box(memory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobspec, "total_memory", lambda: None)
    jobspec.check_fits(_cfg(), "a.mrc", 10_000, 4096, 4096)
    with pytest.raises(ConfigError, match=r"box = 256 px does not fit a\.mrc \(200 x 200 px\)"):
        jobspec.check_fits(_cfg(), "a.mrc", 10, 200, 200)
