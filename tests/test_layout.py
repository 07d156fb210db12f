"""The package's folders are its layers, and imports run one way (docs/architecture.md).

Read from the source with `ast`: every `import medcare_dist...` / `from medcare_dist... import`
anywhere in a module (also inside functions) counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medcare_dist"

# What each layer may import besides itself and the foundation (the top-level config, errors,
# files and resources). Layers are listed bottom-up; a layer never imports one above it.
ALLOWED = {
    "adapters": set(),
    "method": {"adapters"},
    "data": set(),
    "dist": set(),
    "artefacts": {"adapters", "method"},
    "training": {"adapters", "method", "data", "dist", "artefacts"},
    "eval": {"adapters", "method", "data", "dist", "artefacts", "training"},
    "tools": {"adapters", "method", "data", "artefacts", "training"},
}
FOUNDATION = {"config", "errors", "files", "resources", "__init__", "__version__", "package_version"}
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "config.py", "errors.py", "files.py"}


def package_imports(path: Path) -> set[str]:
    """The medcare_dist modules `path` imports, as dotted names below the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medcare_dist"):
            base = node.module.split(".")[1:]
            found.update(".".join(base + [a.name]) if not base or (PACKAGE / "/".join(base)).is_dir() else ".".join(base)
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("medcare_dist."))
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package imports absolutely")
    return found


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def test_each_layer_imports_only_the_layers_below_it():
    bad = []
    for name, path in modules().items():
        layer = name.split(".")[0]
        if layer not in ALLOWED:
            continue
        for target in package_imports(path):
            top = target.split(".")[0]
            if top != layer and top not in FOUNDATION and top not in ALLOWED[layer]:
                bad.append(f"{name} imports {target}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_foundation_imports_no_layer():
    for name in ("config", "errors", "files", "resources"):
        path = PACKAGE / f"{name}.py" if (PACKAGE / f"{name}.py").exists() else PACKAGE / name / "__init__.py"
        assert {t.split(".")[0] for t in package_imports(path)} <= FOUNDATION, name


def test_nothing_in_the_package_imports_the_launchers_or_the_benchmarks():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("launch", "bench", "tests")], path


def test_no_import_circles():
    graph = {name: {t for t in package_imports(path) if t in modules()} for name, path in modules().items()}
    done, on_path = set(), []

    def visit(node):
        if node in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(node):] + [node]))
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_few_top_level_modules_and_none_over_450_lines():
    assert {p.name for p in PACKAGE.glob("*.py")} <= TOP_LEVEL
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_adapter_tensor_names_live_with_the_adapters():
    """Only the adapters and the method name adapter parameters and adapter groups."""
    names = ('"ka_A"', '"ka_B"', '"na_A"', '"na_B"', '"lora_A"', '"lora_B"', '"molora"', '"molora."', '"attn_lora"', '.items("knowledge")',
             '.items("alignment")', '"knowledge.', '"alignment.')
    found = {str(path.relative_to(PACKAGE)): hits for path in PACKAGE.rglob("*.py")
             if path.relative_to(PACKAGE).parts[0] not in ("adapters", "method")
             and (hits := [n for n in names if n in path.read_text()])}
    assert not found, found
