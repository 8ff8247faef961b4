"""The layout rules, checked on the source: imports run one way (gpu never imports streamer, formats
never import the live machinery, the console or the simulator), no import cycles (lazy imports
inside functions included), and every pointer into docs/ lands on a heading."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gpu", "streamer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports, at the top or inside functions."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module -> the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def test_gpu_imports_nothing_from_streamer() -> None:
    bad = {m: sorted(d for d in deps if d.startswith("streamer")) for m, deps in _graph().items() if m.startswith("gpu")}
    bad = {m: d for m, d in bad.items() if d}
    assert bad == {}


def test_formats_and_output_never_import_the_live_machinery_ui_or_simulator() -> None:
    upper = ("streamer.live", "streamer.ui", "streamer.sim", "streamer.cli", "streamer.pipeline")
    bad = {m: sorted(d for d in deps if d.startswith(upper))
           for m, deps in _graph().items() if m.startswith(("streamer.formats", "streamer.output"))}
    assert {m: d for m, d in bad.items() if d} == {}


def test_session_core_does_not_import_the_console() -> None:
    graph = _graph()
    for m in graph:
        if m.startswith("streamer.live"):
            assert not any(d.startswith("streamer.ui") for d in graph[m]), m


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(d) == 1:
                cycles.append([*path[path.index(d):], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a module that imports its own package's __init__ (e.g. `from streamer.live import protocol`)
    # resolves to the sibling module, so package edges do not show up as cycles
    assert cycles == []


def test_docs_pointers_land_on_headings() -> None:
    def anchor(heading: str) -> str:
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    headings = {p.name: {anchor(h) for h in re.findall(r"^#+ (.+)$", p.read_text(), re.M)}
                for p in (ROOT / "docs").glob("*.md")}
    files = [*(ROOT / "gpu").rglob("*.py"), *(ROOT / "streamer").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    missing = []
    for f in files:
        for doc, frag in re.findall(r"(?:docs/)?\b([a-z_]+\.md)#([\w\-]+)", f.read_text()):
            if doc in headings and frag not in headings[doc]:
                missing.append(f"{f.relative_to(ROOT)}: {doc}#{frag}")
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    files = [p for pkg in (*PACKAGES, "tests", "benchmarks", "docs") for p in (ROOT / pkg).rglob("*") if p.suffix in (".py", ".md")]
    marker = "REFERENCE" + " §"  # split so this file does not match itself
    assert [str(p.relative_to(ROOT)) for p in [*files, ROOT / "README.md"] if marker in p.read_text()] == []
