"""stages/core by layer, imports pointing one way (docs/architecture.md): a module imports only
modules of its own layer or of the layers below it, the row logic no engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.storage.resume import _imports, module_file

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["config", "storage", "rows", "engines", "runtime", "release"]  # lowest first


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((ROOT / "stages" / "core").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "core" and parts[2] in LAYERS else None


def test_every_core_module_is_in_a_layer():
    loose = [name for name, _ in _modules() if name != "stages.core" and _layer(name) is None]
    assert not loose, f"modules of stages/core outside a layer package: {loose}"


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_its_own_and_those_below(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    wrong = {
        name: sorted(m for m in _imports(path, name, lazy=True) if module_file(m) and _layer(m) in above)
        for name, path in _modules()
        if _layer(name) == layer
    }
    assert not {k: v for k, v in wrong.items() if v}, f"{layer} imports a layer above it: {wrong}"


def test_the_check_finds_an_import_against_the_layers(tmp_path):
    module = tmp_path / "judge.py"
    module.write_text("from stages.core.engines import make_engine\n", encoding="utf-8")
    assert "stages.core.engines" in _imports(module, "stages.core.rows.judge", lazy=True)
    assert _layer("stages.core.engines") in set(LAYERS[LAYERS.index("rows") + 1 :])
