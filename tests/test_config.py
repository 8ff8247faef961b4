from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from streamer import config as c

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    c.add_config_flags(p)
    return p.parse_args(argv)


def test_config_yaml_is_the_schema() -> None:
    # the documented file at the top level is generated from the schema: every key, every default
    assert (ROOT / "config.yaml").read_text() == c.render_yaml()
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert c.from_dict(data) == c.Config()


def test_precedence_defaults_yaml_flags(tmp_path: Path) -> None:
    y = tmp_path / "cfg.yaml"
    y.write_text("box: 200\ngain:\n  flip_x: true\n  mode: divide\neer:\n  upsampling: 2\n")
    cfg = c.build(_parse(["--config", str(y), "--box", "128", "--gain", "g.mrc"]))
    assert cfg.box == 128  # flag beats yaml
    assert cfg.gain.flip_x is True and cfg.gain.mode == "divide"  # yaml beats default
    assert cfg.gain.file == "g.mrc"  # --gain is gain.file
    assert cfg.eer.upsampling == 2
    assert cfg.dose_per_frame is None and cfg.apix is None  # never assumed: from the data or the user


def test_flags_share_names_with_keys() -> None:
    ns = _parse(["--dose-per-frame", "0.8", "--apix", "1.06", "--fcrop-box", "64", "--float16", "--no-local-enabled",
                 "--picks-scale", "2", "--gain-rotate", "1", "--max-movies", "3"])
    cfg = c.build(ns)
    assert (cfg.dose_per_frame, cfg.fcrop_box, cfg.float16, cfg.local.enabled) == (0.8, 64, True, False)
    assert (cfg.picks.scale, cfg.gain.rotate, cfg.max_movies) == (2.0, 1, 3)
    assert cfg.out_box == 64 and cfg.out_apix == pytest.approx(1.06 * 256 / 64)
    with pytest.raises(c.ConfigError, match="pixel size is not known: pass --apix"):
        _ = c.build(_parse([])).out_apix


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"box": 255}, "box must be an even"),
        ({"fcrop_box": 512}, "fcrop_box"),
        ({"apix": -1}, "apix must be > 0"),
        ({"dose_per_frame": "lots"}, "dose_per_frame = 'lots' is not a valid float"),
        ({"eer": {"upsampling": 3}}, "eer.upsampling = 3 must be one of 1, 2, 4"),
        ({"gain": {"mode": "sideways"}}, "gain.mode"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"gain": {"flipx": True}}, "unknown key gain.flipx"),
    ],
)
def test_validation_messages(data: dict, fragment: str) -> None:
    with pytest.raises(c.ConfigError, match=None) as info:
        c.from_dict(data)
    assert fragment in str(info.value)


def test_frozen() -> None:
    cfg = c.Config()
    with pytest.raises(AttributeError):
        cfg.box = 128  # type: ignore[misc]


def test_fingerprint_tracks_processing_parameters_only() -> None:
    base = c.Config()
    assert base.fingerprint() == c.Config(workers=4, out="/elsewhere", poll=1.0).fingerprint()
    assert base.fingerprint() != c.Config(box=128).fingerprint()
    assert base.fingerprint() != c.from_dict({"gain": {"flip_y": True}}).fingerprint()
    assert base.fingerprint() != c.from_dict({"local": {"enabled": False}}).fingerprint()


def test_bad_yaml_file(tmp_path: Path) -> None:
    y = tmp_path / "bad.yaml"
    y.write_text("box: [1, 2\n")
    with pytest.raises(c.ConfigError, match=r"bad\.yaml: not valid YAML"):
        c.load_yaml(y)
