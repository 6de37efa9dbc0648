"""The layering of docs/architecture.md, enforced: no module imports a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower numbers are lower layers; a module may import its own layer and any below it.
LAYERS = {
    "label_config": 0,
    "pipeline.core": 1,
    "pipeline.model": 2,
    "pipeline.slim": 3,
    "pipeline.labelstudio": 4,
    "pipeline.cli": 5,
    "pipeline.demo": 5,
    "pipeline.__main__": 5,
    "ml_backend": 6,
}
PACKAGE_ROOTS = ("pipeline", "ml_backend", "label_config")
VERSION_ONLY = "pipeline"  # the package itself holds nothing but __version__: any layer may read it


def layer_of(module: str) -> int:
    """The layer of a dotted module name: its longest prefix in LAYERS."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in PACKAGE_ROOTS}


SOURCES = sorted(p for root in PACKAGE_ROOTS for p in (ROOT / root).rglob("*.py"))


def test_every_source_file_belongs_to_a_layer() -> None:
    modules = [module_name(p) for p in SOURCES if module_name(p) != VERSION_ONLY]
    assert len(modules) > 30
    for module in modules:
        layer_of(module)  # raises for a module outside every layer


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    module = module_name(path)
    if module == VERSION_ONLY:
        assert not our_imports(path), "pipeline/__init__.py must stay import-free: every layer reads it"
        return
    own = layer_of(module)
    upward = sorted(name for name in our_imports(path) if name != VERSION_ONLY and layer_of(name) > own)
    assert not upward, f"{module} (layer {own}) imports higher layers: {upward}"


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule itself: a core module importing slim would be reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.slim.curate import curate_run\n")
    assert our_imports(bad) == {"pipeline.slim.curate"}
    assert layer_of("pipeline.slim.curate") > layer_of("pipeline.core.run")
