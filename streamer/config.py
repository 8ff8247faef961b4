"""One frozen, validated configuration object, built once from config.yaml + CLI flags.

Naming rule (the only one): a top-level key ``foo_bar`` is the flag ``--foo-bar``; a key
``bar`` inside section ``foo`` is the flag ``--foo-bar`` (``gain.flip_x`` -> ``--gain-flip-x``).
A section's path key (``gain.file``, ``picks.dir``) also answers to the section's name
(``--gain FILE``, ``--picks DIR``). Precedence: defaults < config.yaml < flags.

Every field carries its one-line help in ``metadata["help"]``; ``render_yaml()`` writes the
documented top-level ``config.yaml`` from this schema, so the file and the code cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from streamer.errors import ConfigError

if TYPE_CHECKING:
    from gpu.local import LocalParams


def _f(default: Any, help: str, choices: tuple | None = None, processing: bool = True, internal: bool = False) -> Any:
    """A config field. ``processing`` marks fields that change the particles written
    (they enter the fingerprint the ledger checks on restart); ``internal`` ones are set by lmc
    itself (no flag, not in config.yaml)."""
    return field(default=default, metadata={"help": help, "choices": choices, "processing": processing,
                                            "internal": internal})


@dataclass(frozen=True)
class GainConfig:
    file: str | None = _f(None, "gain reference (.mrc, .tif, EER .gain); none = data already gain-corrected")
    mode: str = _f(
        "auto",
        "multiply|divide|auto (auto: divide for .gain (EER), multiply for .mrc/.tif)",
        ("auto", "multiply", "divide"),
    )
    flip_x: bool = _f(False, "mirror the gain left-right (reverse columns), applied after rotate")
    flip_y: bool = _f(False, "mirror the gain top-bottom (reverse rows), applied after rotate")
    rotate: int = _f(0, "rotate the gain by this many quarter turns counter-clockwise (numpy.rot90), before flips")
    hot_pixel_sigma: float = _f(6.0, "pixels further than this many sigma above the frame-sum level are hot and replaced; 0 = off")
    defects: str | None = _f(None, "optional defect file: an image (.mrc/.tif, nonzero = bad) or a text list of x y per line")


@dataclass(frozen=True)
class EerConfig:
    upsampling: int = _f(1, "EER grid: 1 = 4K, 2 = 8K, 4 = 16K (costs 4x memory per step)", (1, 2, 4))
    fractions: int = _f(40, "number of output frames; raw EER frames are grouped evenly, leftovers reported")


@dataclass(frozen=True)
class PicksConfig:
    dir: str | None = _f(None, "folder (or single file) of particle picks, matched to movies by file stem", processing=False)
    scale: float = _f(1.0, "multiply pick coordinates by this (picks made on micrographs binned by 2 -> 2.0); only for pick files that do not state their pixel size (rlnMicrographPixelSize, location/micrograph_psize_A), which are scaled automatically")
    format: str = _f("auto", "auto|star|box|topaz|cs", ("auto", "star", "box", "topaz", "cs"))


@dataclass(frozen=True)
class MotionConfig:
    max_resolution: float = _f(8.0, "full-frame motion: highest resolution used (Å); frames are binned to this Nyquist")
    bfactor: float = _f(500.0, "full-frame motion: B-factor (Å^2) applied to frames before correlation")
    iterations: int = _f(10, "full-frame motion: maximum refinement iterations (frame vs sum of the others)")
    tolerance: float = _f(0.01, "full-frame motion: stop when no shift changes by more than this (movie pixels)")
    reference_frame: int = _f(-1, "frame whose position is zero (0-based); -1 = central frame, as MotionCor2")
    smoothing: float = _f(1.0, "full-frame motion: strength of the smoothness prior over exposure (0 = off; 4 halves the allowed wobble)")
    max_shift: float = _f(150.0, "full-frame motion: largest shift searched between a frame and the others (Å)")
    burst_basis: bool = _f(True, "full-frame motion prior: the fast start as a few saturating exponentials (tau 2, 4, 8 e/Å²) plus a smooth residual; false = the burst envelope alone")


@dataclass(frozen=True)
class LocalConfig:
    enabled: bool = _f(True, "estimate per-particle trajectories; false = full-frame-only extraction")
    align_box: int = _f(0, "box (px) cut for per-particle alignment; 0 = same as box")
    band_low: float = _f(500.0, "per-particle alignment: lowest resolution used (Å)")
    band_high: float = _f(8.0, "per-particle alignment: highest resolution used (Å)")
    bfactor: float = _f(0.0, "per-particle alignment: extra B-factor (Å^2) on the correlation (the likelihood weights already follow the SNR)")
    bin_min_particles: int = _f(150, "per-particle alignment patches are summed 2x2 (when the band ends below a quarter of Nyquist) only for movies with at least this many particles to align: binning halves the stage's cost but loses up to 15 % of the band edge's signal, which sparse movies need; 0 = always when the band allows")
    sigma_field: float = _f(2.0, "prior on the shared local field's velocity at zero exposure (Å per e/Å²)")
    burst_exposure: float = _f(2.5, "the field's velocity prior decays as N0/(N+N0) with exposure N: N0 (e/Å²)")
    sigma_velocity: float = _f(0.05, "prior on each particle's own residual velocity (Å per e/Å²), as RELION polishing")
    sigma_acceleration: float = _f(0.5, "prior on the field's and residuals' acceleration (Å per (e/Å²)^2)")
    correlation_length: float = _f(1000.0, "spatial correlation length of local motion between particles (Å)")
    kernel: str = _f("gaussian", "spatial kernel of the field: gaussian (smooth) or exponential (RELION)", ("gaussian", "exponential"))
    auto_smoothing: bool = _f(False, "choose sigma_field among x0.5/x1/x2 by the held-out score (slower)")
    first_frame: int = _f(0, "first frame used for alignment (0-based)")
    last_frame: int = _f(-1, "last frame used for alignment (inclusive); -1 = last")
    guard: bool = _f(True, "fall back to the (improved) full-frame trajectory for a movie where local motion is not supported by held-out frames")
    common: bool = _f(True, "correct the full-frame trajectory by a common term fitted jointly from all particles and the background")
    field_scale: float = _f(0.15, "the field's time-course prior = the full-frame motion prior (burst basis + smooth residual) with its scales times this; 0 = the velocity prior of sigma_field/burst_exposure")
    field_evidence: bool = _f(True, "choose the field prior's scale per movie (field_scale x 1/8 ... 4) by its Laplace evidence from a first fit")

    def params(self) -> LocalParams:
        """The per-particle model's parameters (gpu/local.py), every one from this section."""
        from gpu.local import LocalParams

        return LocalParams(**{f.name: getattr(self, f.name) for f in fields(LocalParams)})


@dataclass(frozen=True)
class SlurmConfig:
    workers: int = _f(0, "worker jobs to keep alive under Slurm (sbatch); 0 = none. With slurm.workers > 0, workers = 0 means no local workers", processing=False)
    args: str = _f("", "extra sbatch arguments for every worker job, e.g. --slurm-args=\"--partition=gpu --gres=gpu:1 --time=12:00:00\"", processing=False)
    script: str | None = _f(None, "job script template (modules, containers): a file whose {command} is replaced by the worker command line", processing=False)
    host: str = _f("", "address Slurm jobs use to reach this machine (the head node); empty = this machine's fully qualified name", processing=False)


@dataclass(frozen=True)
class Config:
    # where things are
    movies: str | None = _f(None, "movies: a glob (\"raw/*.tiff\") or a folder", processing=False)
    out: str | None = _f(None, "output folder (stacks/, particles.star, particles.cs, trajectories/, plots/)", processing=False)
    # session metadata
    apix: float | None = _f(None, "movie pixel size (Å/px); unset: read from the movies' MRC header or the pick file's optics group (rlnMicrographOriginalPixelSize); lmc stops when it is known nowhere or sources disagree")
    dose_per_frame: float | None = _f(None, "exposure per movie frame (e/Å²), the cryoSPARC 'override e/Å²/frame'; required: lmc never assumes it")
    apix_source: str | None = _f(None, "where apix came from (set by lmc)", processing=False, internal=True)
    pre_exposure: float = _f(0.0, "exposure before the first frame (e/Å²)")
    kv: float = _f(300.0, "acceleration voltage (kV)")
    cs: float = _f(2.7, "spherical aberration (mm)")
    amplitude_contrast: float = _f(0.1, "amplitude contrast (fraction)")
    # extraction
    box: int = _f(256, "extraction box (px, movie pixels); see `lmc boxsize`")
    fcrop_box: int = _f(0, "Fourier-crop the box to this size (px); 0 = no cropping")
    dose_weighting: bool = _f(True, "Grant & Grigorieff exposure weighting")
    uncertainty_weighting: bool = _f(True, "with dose_weighting: also weight each frame by the expected attenuation of its alignment error (a per-frame B-factor from the posterior sd of the full-frame trajectory s + c)")
    normalize: bool = _f(True, "zero mean, unit std of the background outside a circle (RELION convention)")
    invert_contrast: bool = _f(False, "multiply particles by -1 (dark protein -> white)")
    edge: str = _f("skip", "particles whose box leaves a frame: skip (count them) or pad (frame mean)", ("skip", "pad"))
    # outputs
    float16: bool = _f(False, "write stacks in 16-bit float (MRC mode 12)")
    stack_size: int = _f(10000, "start a new stack file after this many particles", processing=False)
    plots: bool = _f(True, "write plots/<movie>.png (trajectories scaled 40x)", processing=False)
    max_movies: int = _f(0, "only process this many movies; 0 = all", processing=False)
    # compute
    device: str = _f("auto", "auto|cpu|gpu: use CuPy when a GPU is present (auto) or always/never", ("auto", "cpu", "gpu"), processing=False)
    workers: int = _f(0, "local worker processes; 0 = one per GPU, or 1 on CPU (none when slurm.workers > 0)", processing=False)
    threads: int = _f(0, "CPU threads per worker (FFTs, decoding, chunked array work); 0 = all cores / workers", processing=False)
    gpus: str = _f("auto", "GPUs to use: auto, or a list like 0,1", processing=False)
    # live
    poll: float = _f(5.0, "seconds between full rescans of the input folders (always on: network mounts miss events)", processing=False)
    poll_only: bool = _f(False, "use polling only, no filesystem events", processing=False)
    settle_seconds: float = _f(5.0, "a file is ready when its size and mtime were unchanged this long (and it is whole)", processing=False)
    incomplete_timeout: float = _f(600.0, "report a settled movie still shorter than its header says after this long (s); an invalid one is reported at once", processing=False)
    picks_timeout: float = _f(0.0, "give up on a movie whose picks do not arrive within this many seconds; 0 = wait forever", processing=False)
    newest_first: bool = _f(False, "process the newest movies first (catching up while keeping recent data fresh)", processing=False)
    bind: str = _f("tcp://127.0.0.1:0", "dispatcher address (always CURVE: the session's own keys in OUT/keys, or --keys)", processing=False)
    keys: str | None = _f(None, "folder with CURVE keys from `lmc keys` (default: OUT/keys, made by the session)", processing=False)
    heartbeat: float = _f(1.0, "seconds between heartbeats, dispatcher <-> workers", processing=False)
    liveness: int = _f(5, "missed heartbeats before a worker is declared dead and its job requeued", processing=False)
    max_attempts: int = _f(3, "a movie whose job killed this many workers is set aside as failed", processing=False)
    reprocess_changed_picks: bool = _f(False, "reprocess a movie whose pick file changed after it was done", processing=False)
    min_free_gb: float = _f(2.0, "pause dispatch while the output folder's disk has less free space than this (GB; 0 = never)", processing=False)
    # sections
    gain: GainConfig = field(default_factory=GainConfig)
    eer: EerConfig = field(default_factory=EerConfig)
    picks: PicksConfig = field(default_factory=PicksConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        _validate(self)

    # -- derived values -----------------------------------------------------------
    @property
    def out_box(self) -> int:
        """Box of the written particles (after Fourier cropping)."""
        return self.fcrop_box or self.box

    @property
    def out_apix(self) -> float:
        """Pixel size of the written particles (Å)."""
        return self.pixel_size * self.box / self.out_box

    @property
    def pixel_size(self) -> float:
        """``apix``, which must be known by now (``streamer.physical`` resolves it)."""
        if self.apix is None:
            raise ConfigError("config: the movie pixel size is not known: pass --apix (Å/px)")
        return self.apix

    def fingerprint(self) -> str:
        """Hash of every parameter that changes the particles written."""
        return hashlib.sha256(json.dumps(processing_dict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_(self, **changes: Any) -> Config:
        """A copy with top-level fields changed (validated again)."""
        return replace(self, **changes)


SECTIONS: dict[str, type] = {
    "gain": GainConfig,
    "eer": EerConfig,
    "picks": PicksConfig,
    "motion": MotionConfig,
    "local": LocalConfig,
    "slurm": SlurmConfig,
}
# a section's path-like key that also answers to the bare section flag
SECTION_MAIN_KEY = {"gain": "file", "picks": "dir"}


def processing_dict(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in SECTIONS:
            section = {g.name: getattr(value, g.name) for g in fields(value) if g.metadata.get("processing", True)}
            if section:  # a section of compute settings only (slurm) leaves the fingerprint as it was
                out[f.name] = section
        elif f.metadata.get("processing", True):
            out[f.name] = value
    # the gain file's identity matters, not where the path string came from
    out["gain"]["file"] = Path(cfg.gain.file).name if cfg.gain.file else None
    if cfg.gain.defects:
        out["gain"]["defects"] = Path(cfg.gain.defects).name
    return out


def _base_type(tp: Any) -> type:
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(tp, str):
        tp = eval(tp, {"str": str, "int": int, "float": float, "bool": bool, "None": None})
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _coerce(name: str, value: Any, tp: type, choices: tuple | None) -> Any:
    base = _base_type(tp)
    if value is None:
        if "None" not in str(tp):
            raise ConfigError(f"config: {name} must not be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(value)
                value = low in ("true", "yes", "1", "on")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif base is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: {name} = {value!r} is not a valid {base.__name__}") from None
    if choices is not None and value not in choices:
        raise ConfigError(f"config: {name} = {value!r} must be one of {', '.join(map(str, choices))}")
    return value


MAX_BOX = 8192


def _validate(cfg: Config) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config: {msg}")

    need(cfg.apix is None or cfg.apix > 0, f"apix must be > 0 (got {cfg.apix})")
    need(cfg.dose_per_frame is None or cfg.dose_per_frame > 0, f"dose_per_frame must be > 0 e/Å² (got {cfg.dose_per_frame})")
    apix = cfg.apix or 0.0  # the Nyquist checks below wait for a known pixel size
    need(cfg.pre_exposure >= 0, "pre_exposure must be >= 0")
    need(50 <= cfg.kv <= 400, f"kv must be between 50 and 400 (got {cfg.kv})")
    need(cfg.box >= 16 and cfg.box % 2 == 0, f"box must be an even number >= 16 (got {cfg.box})")
    # no detector is wider (K3 5760 x 4092; EER 4096 at upsampling 1); the session also checks each
    # movie's own size and the machine's memory before the first job (streamer.live.jobspec)
    need(cfg.box <= MAX_BOX, f"box must be at most {MAX_BOX} px, the size of the largest detector (got {cfg.box})")
    need(
        cfg.fcrop_box == 0 or (8 <= cfg.fcrop_box <= cfg.box and cfg.fcrop_box % 2 == 0),
        f"fcrop_box must be 0 or an even number between 8 and box={cfg.box} (got {cfg.fcrop_box})",
    )
    need(cfg.stack_size >= 1, "stack_size must be >= 1")
    need(cfg.max_movies >= 0, "max_movies must be >= 0")
    need(cfg.workers >= 0, "workers must be >= 0")
    need(cfg.slurm.workers >= 0, "slurm.workers must be >= 0")
    need(cfg.threads >= 0, "threads must be >= 0")
    need(cfg.poll > 0, "poll must be > 0 s")
    need(cfg.settle_seconds >= 0, "settle_seconds must be >= 0")
    need(cfg.heartbeat > 0 and cfg.liveness >= 2, "heartbeat must be > 0 and liveness >= 2")
    need(cfg.max_attempts >= 1, "max_attempts must be >= 1")
    need(cfg.gain.rotate in (0, 1, 2, 3, -1, -2, -3), "gain.rotate must be a number of quarter turns, -3..3")
    need(cfg.gain.hot_pixel_sigma >= 0, "gain.hot_pixel_sigma must be >= 0")
    need(cfg.eer.fractions >= 1, "eer.fractions must be >= 1")
    need(cfg.picks.scale > 0, "picks.scale must be > 0")
    need(cfg.motion.max_resolution >= 2 * apix, "motion.max_resolution must be >= 2 * apix (Nyquist)")
    need(cfg.motion.bfactor >= 0 and cfg.motion.iterations >= 1, "motion.bfactor >= 0 and motion.iterations >= 1")
    need(cfg.motion.smoothing >= 0 and cfg.motion.max_shift > 0, "motion.smoothing >= 0 and motion.max_shift > 0")
    need(cfg.local.align_box == 0 or (cfg.local.align_box >= 16 and cfg.local.align_box % 2 == 0), "local.align_box must be 0 or even >= 16")
    need(cfg.local.band_low > cfg.local.band_high >= 2 * apix, "local.band_low > local.band_high >= 2 * apix")
    need(
        cfg.local.sigma_velocity > 0 and cfg.local.sigma_acceleration > 0 and cfg.local.sigma_field > 0,
        "local.sigma_* must be > 0",
    )
    need(cfg.local.burst_exposure > 0, "local.burst_exposure must be > 0 e/Å²")
    need(cfg.local.bin_min_particles >= 0, "local.bin_min_particles must be >= 0")
    need(cfg.local.correlation_length > 0, "local.correlation_length must be > 0 Å")
    gpus = cfg.gpus.strip()
    if gpus != "auto":
        try:
            [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise ConfigError(f"config: gpus = {cfg.gpus!r} must be 'auto' or a list like 0,1") from None


# -- building -----------------------------------------------------------------------


def _section_from(name: str, cls: type, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config: unknown key {name}.{key} (known: {', '.join(known)})")
        f = known[key]
        kwargs[key] = _coerce(f"{name}.{key}", value, f.type, f.metadata.get("choices"))
    return cls(**kwargs)


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Apply nested ``data`` (as read from YAML) on top of ``base`` (defaults when None)."""
    base = base or Config()
    top = {f.name: f for f in fields(Config)}
    changes: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key not in top:
            raise ConfigError(f"config: unknown key {key!r}")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config: {key} must be a section (mapping)")
            merged = dataclasses.asdict(getattr(base, key)) | value
            changes[key] = _section_from(key, SECTIONS[key], merged)
        else:
            f = top[key]
            changes[key] = _coerce(key, value, f.type, f.metadata.get("choices"))
    return replace(base, **changes)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def _flag_name(section: str | None, key: str) -> str:
    return "--" + (f"{section}-{key}" if section else key).replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """Add one flag per config key (see the naming rule in this module's docstring).

    Every flag defaults to ``None`` (= not given) so precedence stays defaults < yaml < flags.
    """
    group = parser.add_argument_group("configuration (same names as config.yaml keys)")
    group.add_argument("--config", metavar="YAML", help="config file (default: ./config.yaml if present)")

    def add(section: str | None, f: dataclasses.Field) -> None:
        if f.metadata.get("internal"):
            return
        dotted = f"{section}.{f.name}" if section else f.name
        if only is not None and dotted not in only and (section or "") not in only:
            return
        names = [_flag_name(section, f.name)]
        if section and SECTION_MAIN_KEY.get(section) == f.name:
            names.insert(0, f"--{section}")
        base = _base_type(f.type)
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        if base is bool:
            group.add_argument(*names, dest=dotted, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            metavar = {int: "N", float: "X", str: "S"}[base]
            group.add_argument(*names, dest=dotted, metavar=metavar, default=None, help=helptext)

    for f in fields(Config):
        if f.name in SECTIONS:
            for g in fields(SECTIONS[f.name]):
                add(f.name, g)
        else:
            add(None, f)


def flags_to_dict(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in vars(ns).items():
        if value is None or dotted == "config":
            continue
        top = {f.name for f in fields(Config)}
        if "." in dotted:
            section, key = dotted.split(".", 1)
            out.setdefault(section, {})[key] = value
        elif dotted in top:
            out[dotted] = value
    return out


def build(ns: argparse.Namespace | None = None, config_path: str | Path | None = None, **overrides: Any) -> Config:
    """defaults < config.yaml < flags < ``overrides`` (nested dicts allowed)."""
    path = config_path or (getattr(ns, "config", None) if ns is not None else None)
    data: dict[str, Any] = {}
    if path:
        data = load_yaml(path)
    elif ns is not None and Path("config.yaml").is_file():
        data = load_yaml("config.yaml")
    cfg = from_dict(data)
    if ns is not None:
        cfg = from_dict(flags_to_dict(ns), cfg)
    if overrides:
        cfg = from_dict(overrides, cfg)
    return cfg


def render_yaml() -> str:
    """The documented config.yaml: every key, its default, its one-line help."""
    lines = [
        "# lmc configuration: every key, its default and what it does.",
        "# Each key is also a command-line flag: top-level `foo_bar` -> --foo-bar, section key",
        "# `gain.flip_x` -> --gain-flip-x; --gain FILE and --picks DIR set gain.file and picks.dir.",
        "# Precedence: defaults < this file < flags.",
        "",
    ]

    def fmt(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    cfg = Config()
    for f in fields(Config):
        if f.name in SECTIONS:
            lines.append(f"{f.name}:")
            for g in fields(SECTIONS[f.name]):
                lines.append(f"  {g.name}: {fmt(getattr(getattr(cfg, f.name), g.name))}  # {g.metadata['help']}")
        elif not f.metadata.get("internal"):
            lines.append(f"{f.name}: {fmt(getattr(cfg, f.name))}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n"
