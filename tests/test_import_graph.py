"""The package's import graph, drawn from the source (every ``import``, at module level or
inside a function): no circles, no upward imports across the layers of docs/layout.md, no
runner importing another runner, and no private name imported from another module."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"diffcr": ROOT / "python" / "diffcr", "diffcr_kernels": ROOT / "diffcr_kernels"}

#: the layers, lowest first; a module may import its own layer and the ones below it. The
#: first prefix that matches a module's name gives its layer (longer prefixes listed first
#: where a package spans two layers).
LAYERS = [
    ("kernels", ["diffcr_kernels"]),
    ("library base", ["diffcr._version", "diffcr.config", "diffcr.modules",
                      "diffcr.token_cache", "diffcr.keep_mask"]),
    ("models", ["diffcr.models"]),
    ("routing", ["diffcr.routing"]),
    ("library", ["diffcr.convert", "diffcr.training", "diffcr.io", "diffcr.lora", "diffcr.cpu",
                 "diffcr.cache_control", "diffcr"]),
    ("app config", ["diffcr.app.options", "diffcr.app.bench_kinds", "diffcr.app"]),
    ("data", ["diffcr.app.image_folder", "diffcr.app.video", "diffcr.app.demo.data",
              "diffcr.app.demo.classifier", "diffcr.app.demo.metrics", "diffcr.app.demo.plots",
              "diffcr.app.demo.peers", "diffcr.app.demo.compare", "diffcr.app.demo.inpaint",
              "diffcr.app.demo"]),
    ("training core", ["diffcr.app.core", "diffcr.app.parallel", "diffcr.app.ddpm"]),
    ("recipes", ["diffcr.app.recipes"]),
    ("runners", ["diffcr.app.classcond", "diffcr.app.captioned", "diffcr.app.demo.run",
                 "diffcr.app.generate", "diffcr.app.bench"]),
    ("cli", ["diffcr.app.cli", "diffcr.__main__"]),
]
RUNNERS = dict(LAYERS)["runners"]


def _modules():
    mods = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imports(mods):
    """``{module: {imported module: line}}`` and the private names imported across modules."""
    edges, private = {}, []
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package[:len(package) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{a.name}"
                    targets.append((full, None) if full in mods else (base, a.name))
            for target, name in targets:
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target not in mods or target == mod:
                    continue
                edges.setdefault(mod, {}).setdefault(target, node.lineno)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{mod}:{node.lineno} imports {target}.{name}")
    return edges, private


def _layer(mod):
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{mod} is in no layer of LAYERS: add it (and to docs/layout.md)")


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    assert "diffcr.routing" in mods and "diffcr_kernels.ops" in mods  # the walk found them
    return mods, *_imports(mods)


def test_every_module_has_a_layer(graph):
    mods, _, _ = graph
    for mod in mods:
        _layer(mod)


def test_no_upward_imports(graph):
    _, edges, _ = graph
    up = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]}), line {line}"
          for a, targets in edges.items() for b, line in targets.items()
          if _layer(b) > _layer(a)]
    assert not up, "\n".join(up)


def test_runners_never_import_each_other(graph):
    _, edges, _ = graph

    def runner(m):
        return next((r for r in RUNNERS if m == r or m.startswith(r + ".")), None)

    crossing = [f"{a} imports {b}" for a, targets in edges.items() for b in targets
                if runner(a) and runner(b) and runner(a) != runner(b)]
    assert not crossing, "\n".join(crossing)


def _circles(mods, edges):
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return circles


def test_no_circles(graph):
    mods, edges, _ = graph
    circles = _circles(mods, edges)
    assert not circles, circles


def test_no_private_name_crosses_modules(graph):
    _, _, private = graph
    assert not private, "\n".join(private)


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The walk itself: a throwaway package with a circle, an upward import and a private
    import is reported on all three (so an empty report above means something)."""
    pkg = tmp_path / "diffcr"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routing.py").write_text("from .models.x import _hidden\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "x.py").write_text("def f():\n    from .. import routing\n")
    monkeypatch.setitem(PACKAGES, "diffcr", pkg)
    monkeypatch.setitem(PACKAGES, "diffcr_kernels", tmp_path / "none")
    mods = _modules()
    edges, private = _imports(mods)
    assert edges["diffcr.models.x"] == {"diffcr.routing": 2}
    assert private == ["diffcr.routing:1 imports diffcr.models.x._hidden"]
    assert _circles(mods, edges) == [["diffcr.models.x", "diffcr.routing"]]
    assert _layer("diffcr.models.x") < _layer("diffcr.routing")  # models -> routing is upward
