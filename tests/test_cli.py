"""The `lmc` command as a user runs it: simulate, run (twice), max-movies, boxsize, bad input."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import pytest
import starfile
from lmc_cli import lmc

from streamer.sim.simulate import SimParams, simulate_session


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    simulate_session(root / "s", SimParams(movies=3, frames=12, shape=(384, 384), particles=6, seed=3))
    return root


def _run_args(root: Path, out: str, *extra: str) -> list[str]:
    s = root / "s"
    return ["run", "--movies", str(s / "movies"), "--picks", str(s / "picks"), "--gain", str(s / "gain.mrc"),
            "--out", str(root / out), "--apix", "1", "--dose-per-frame", "1", "--box", "96", "--fcrop-box", "64", "--workers", "2", "--settle-seconds", "0",
            *extra]


def test_run_twice_never_duplicates(session: Path) -> None:
    first = lmc(*_run_args(session, "out"), cwd=session)
    assert first.returncode == 0, first.stderr
    assert "movies done: 3" in first.stdout and "failed: 0" in first.stdout
    star = starfile.read(session / "out" / "particles.star")
    parts = star["particles"]
    n = len(parts)
    assert n > 0 and f"particles written: {n}" in first.stdout
    assert star["optics"]["rlnImageSize"].iloc[0] == 64
    names = set(parts["rlnImageName"])
    assert len(names) == n  # every particle once
    # stacks hold exactly the particles the STAR references
    total = 0
    for f in sorted((session / "out" / "stacks").glob("*.mrcs")):
        with mrcfile.open(f, permissive=False) as m:
            total += m.data.shape[0]
            assert m.data.shape[1:] == (64, 64)
    assert total == n

    second = lmc(*_run_args(session, "out"), cwd=session)
    assert second.returncode == 0, second.stderr
    assert len(starfile.read(session / "out" / "particles.star")["particles"]) == n
    assert f"particles written: {n}" in second.stdout  # totals of the folder, nothing added


def test_max_movies_and_float16(session: Path) -> None:
    res = lmc(*_run_args(session, "out16", "--max-movies", "1", "--float16"), cwd=session)
    assert res.returncode == 0, res.stderr
    assert "movies done: 1" in res.stdout
    stack = next((session / "out16" / "stacks").glob("*.mrcs"))
    with mrcfile.open(stack) as m:
        assert m.header.mode == 12 and m.data.dtype.itemsize == 2


def test_changed_parameters_are_refused(session: Path) -> None:
    assert lmc(*_run_args(session, "outp", "--max-movies", "1"), cwd=session).returncode == 0
    args = _run_args(session, "outp")
    args[args.index("--box") + 1] = "128"
    res = lmc(*args, cwd=session)
    assert res.returncode == 2
    assert "box" in res.stderr and "Traceback" not in res.stderr


def test_bad_config_value_is_one_line(session: Path) -> None:
    res = lmc(*_run_args(session, "outx", "--box", "255"), cwd=session)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "box must be an even number" in res.stderr


def test_boxsize_rosenthal_henderson(tmp_path: Path) -> None:
    res = lmc("boxsize", "--diameter", "150", "--defocus", "20000", "--resolution", "3", "--kv", "300", cwd=tmp_path)
    assert res.returncode == 0
    fields = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())
    # 2 λ Δf / r with λ(300 kV) = 0.019688 Å: 262.5 Å of delocalisation (docs/physics.md#geometry)
    assert float(fields["delocalisation_A"]) == pytest.approx(262.5, abs=0.5)
    assert int(fields["box_px"]) >= 413


@pytest.mark.parametrize(("flag", "value"), [("--diameter", "-150"), ("--resolution", "0"), ("--defocus", "-5000")])
def test_boxsize_bad_values_name_the_flag_in_one_line(tmp_path: Path, flag: str, value: str) -> None:
    args = {"--diameter": "150", "--defocus": "20000", "--resolution": "3", flag: value}
    res = lmc("boxsize", *[x for kv in args.items() for x in kv], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith(f"lmc: boxsize: {flag} must be") and len(res.stderr.strip().splitlines()) == 1


def test_simulate_bad_parameter_is_one_line(tmp_path: Path) -> None:
    res = lmc("simulate", str(tmp_path / "sim"), "--movies", "1", "--mass-kda", "-3", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "lmc: simulate: mass_kda and kv must be > 0"


def test_simulate_command(tmp_path: Path) -> None:
    res = lmc("simulate", str(tmp_path / "sim"), "--movies", "1", "--frames", "6", "--shape", "256", "256",
              "--particles", "3", "--format", "mrc", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    movies = list((tmp_path / "sim" / "movies").glob("*.mrc"))
    assert len(movies) == 1
    with mrcfile.open(movies[0]) as m:
        assert m.data.shape == (6, 256, 256)


def test_missing_gain_stops_cleanly_before_writing(session: Path) -> None:
    args = _run_args(session, "outg")
    args[args.index("--gain") + 1] = str(session / "no_such_gain.mrc")
    res = lmc(*args, cwd=session)
    assert res.returncode == 2
    assert "no_such_gain.mrc: gain.file not found" in res.stderr and "Traceback" not in res.stderr
    assert not (session / "outg").exists()


@pytest.mark.parametrize("command", ["run", "watch", "worker", "status", "keys", "simulate", "demo", "boxsize"])
def test_every_command_prints_its_help(tmp_path: Path, command: str) -> None:
    """``lmc COMMAND --help`` exits 0 with its usage (a config help text with a literal '%' once broke
    argparse's formatting of ``run --help`` with a traceback)."""
    res = lmc(command, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: lmc {command}") and "Traceback" not in res.stderr
    if command == "run":
        assert "--local-bin-min-particles" in res.stdout and "15 % of the band edge" in " ".join(res.stdout.split())

