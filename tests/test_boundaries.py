"""Package boundaries: the import graph has no cycle, the library never imports the app or `analysis`, and the light
imports (`tgvkv.select`, the policies, `analysis`) do not load torch, transformers or gradio.

The graph is read from the source (AST, every import incl. the ones inside functions), at the granularity of the
design card: `app`, `analysis`, `analysis.webapp`, each `tgvkv.<subpackage>`, and the `tgvkv` top-level modules in
two layers: `tgvkv.core`, the foundation the policies build on (token layout, attention statistics, images,
input checks), and `tgvkv`, the engine and facade (selection runner, traces, generation steps, cache, capture,
loading, CLI).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: top-level tgvkv modules the policies may import: numpy/PIL only, nothing from tgvkv outside this group
CORE = {"layout", "stats", "errors", "images", "vocabulary", "validation", "geometry", "families"}
LIBRARY = ("tgvkv",)
FORBIDDEN_FOR_LIBRARY = ("analysis", "analysis.webapp", "app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = {module_name(p): p for top in ("tgvkv", "analysis") for p in sorted((REPO / top).rglob("*.py"))}
    files["app"] = REPO / "app.py"
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every first-party module `name` imports (relative imports resolved; `from pkg import sub` names `pkg.sub`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import tgvkv.policies.base` -> the module itself
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    return out


def node_of(module: str) -> str:
    """The graph node of a module: app, analysis, analysis.webapp, tgvkv.<subpackage>, tgvkv.core or tgvkv."""
    parts = module.split(".")
    if parts[0] == "analysis":
        return "analysis.webapp" if parts[1:2] == ["webapp"] else "analysis"
    if parts[0] == "tgvkv" and len(parts) > 1:
        if (REPO / "tgvkv" / parts[1]).is_dir():
            return f"tgvkv.{parts[1]}"
        return "tgvkv.core" if parts[1] in CORE else "tgvkv"
    return parts[0]


def module_graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    return {name: imported_modules(name, path, known) - {name} for name, path in files.items()}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        src = node_of(module)
        graph.setdefault(src, set()).update(node_of(t) for t in targets if node_of(t) != src)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def render(graph: dict[str, set[str]]) -> str:
    lines = (f"{src} -> {', '.join(sorted(dst)) or '(nothing first-party)'}" for src, dst in sorted(graph.items()))
    return "\n".join(lines)


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: a two-node and a three-node cycle are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_package_graph_has_no_cycle():
    graph = package_graph()
    assert {"app", "analysis", "analysis.webapp", "tgvkv", "tgvkv.core", "tgvkv.policies"} <= set(graph), render(graph)
    assert cycles(graph) == [], "package import cycles:\n" + render(graph)


def test_library_does_not_import_the_app_or_analysis():
    graph = package_graph()
    offending = {src: sorted(dst & set(FORBIDDEN_FOR_LIBRARY)) for src, dst in graph.items()
                 if src.startswith(LIBRARY) and dst & set(FORBIDDEN_FOR_LIBRARY)}
    assert offending == {}, "the library imports the app or analysis:\n" + render(graph)


def test_layers_point_one_way():
    """tgvkv.core imports nothing else of tgvkv; the policies only tgvkv.core; analysis (the pure diagnostics) only
    the library, never the web app."""
    graph = package_graph()
    assert graph["tgvkv.core"] == set(), render(graph)
    assert graph["tgvkv.policies"] == {"tgvkv.core"}, render(graph)
    assert "analysis.webapp" not in graph["analysis"] and "app" not in graph["analysis"], render(graph)
    assert "app" not in graph["analysis.webapp"], render(graph)


def test_web_app_modules_have_no_cycle():
    """Inside the web app package too (the handlers and the export once imported each other)."""
    graph = {m: {t for t in targets if t.startswith("analysis.webapp")}
             for m, targets in module_graph().items() if m.startswith("analysis.webapp")}
    assert cycles(graph) == [], render(graph)


LIGHT_IMPORTS = "import tgvkv.select, tgvkv.layout, tgvkv.policies, tgvkv.stats, tgvkv.trace, analysis"
#: run in a fresh interpreter; prints which first-party module's import pulled a heavy package in, if one did
PROBE = f"""
import builtins, sys
HEAVY = ("torch", "transformers", "gradio")
first = {{}}
real_import = builtins.__import__

def spy(name, globals=None, *args, **kwargs):
    top = name.partition(".")[0]
    if top in HEAVY and top not in first and top not in sys.modules:
        first[top] = (globals or {{}}).get("__name__", "?")
    return real_import(name, globals, *args, **kwargs)

builtins.__import__ = spy
{LIGHT_IMPORTS}
loaded = [m for m in HEAVY if m in sys.modules]
print(loaded)
for m in loaded:
    print(f"{{m}} imported by module {{first.get(m, '?')}}")
"""


def test_light_imports_do_not_load_torch():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[0] == "[]", f"`{LIGHT_IMPORTS}` loaded heavy packages:\n{res.stdout}"


def test_heavy_exports_resolve_on_first_use():
    """`from tgvkv import generate` still works: the lazy names are the real objects, and dir() lists them."""
    import tgvkv
    from tgvkv import capture, generation, images, loading, trace

    assert tgvkv.generate is generation.generate and tgvkv.compare is generation.compare
    assert tgvkv.capturing is capture.capturing
    assert tgvkv.RunOptions is generation.RunOptions and tgvkv.CaptureOptions is generation.CaptureOptions
    assert tgvkv.load_demo_model is loading.load_demo_model and tgvkv.Trace is trace.Trace
    assert tgvkv.load_image is images.load_image_file
    assert set(tgvkv.LAZY_EXPORTS) <= set(tgvkv.__all__) and set(tgvkv.__all__) <= set(dir(tgvkv))
    assert [name for name in tgvkv.__all__ if getattr(tgvkv, name, None) is None] == []
    with pytest.raises(AttributeError, match="has no attribute 'generat'"):
        tgvkv.generat  # noqa: B018 - a typo stays an AttributeError
