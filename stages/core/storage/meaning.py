"""What code means, for resume keys: a digest of a module's AST (docstrings, comments and layout
aside) and of the project modules it imports. Standard library only, and the same digest under every
Python the project supports (3.11-3.13: `canonical` leaves out the empty fields that newer versions
add or that `ast.dump` shows differently), so checkpoints travel between hosts; tests/test_resume.py
computes it under each interpreter it finds."""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from importlib import util
from pathlib import Path

PACKAGE = "stages"
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the `stages` package on disk
# CPython 3.11 can fail two threads parsing at once ("SystemError: AST constructor recursion depth
# mismatch"): every parse of this module holds this lock
_AST_LOCK = threading.Lock()


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of project module `name` (e.g. stages.core.rows.judge) under `root`, if any."""
    root = root or PACKAGE_DIR
    parts = name.split(".")[1:]
    for candidate in (root.joinpath(*parts, "__init__.py"), root.joinpath(*parts).with_suffix(".py")):
        if parts and candidate.is_file():
            return candidate
    return root / "__init__.py" if not parts else None


def _imports(path: Path, name: str, lazy: bool) -> set[str]:
    """Project modules that module `name` (at `path`) imports; with lazy, also inside functions."""
    tree = _parsed(path)
    nodes = ast.walk(tree) if lazy else iter(tree.body)
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else node.module
            )
            found.add(base or "")
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def closure(entry: str, lazy: bool = False, root: Path | None = None) -> dict[str, Path]:
    """Every project module `entry` imports, transitively (with its parent packages): name -> file.

    `lazy=False` follows module-level imports only: the engine backends that `make_engine`
    imports inside a function are keyed by the engine's own identity instead. `lazy=True`
    follows every import: what `dvc.yaml` must list as the stage's code deps.
    """
    todo, seen = [entry], {}
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if name in seen or path is None:
            continue
        seen[name] = path
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend([*parents, *_imports(path, name, lazy)])
    return seen


def _parsed(path: Path) -> ast.Module:
    source = path.read_text(encoding="utf-8")
    with _AST_LOCK:
        return ast.parse(source, filename=str(path))


def code_meaning(path: Path) -> str:
    """sha256 of a module's code as Python sees it: its AST without docstrings. Comments, docstrings,
    blank lines and formatting do not count; any change to what runs does. Safe from any thread."""
    tree = _parsed(path)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = body[0] if body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(json.dumps(canonical(tree)).encode("utf-8")).hexdigest()


def canonical(node: object) -> object:
    """A plain, version-independent form of an AST: [node type, [[field, value]...]] with the fields
    that hold None or [] left out (3.12 added `type_params` to every def, 3.13's `ast.dump` hides empty
    fields) and constants by their repr."""
    if isinstance(node, ast.AST):
        fields = [(name, value) for name, value in ast.iter_fields(node) if value is not None and value != []]
        return [type(node).__name__, [[name, canonical(value)] for name, value in fields]]
    if isinstance(node, list):
        return [canonical(item) for item in node]
    return repr(node)


def code_digest(entry: str, root: Path | None = None) -> str:
    """A digest of the code (code_meaning) of `entry` and the project modules it imports at module
    level: a comment or docstring edit keeps every checkpoint, a change to what runs does not."""
    files = closure(entry, root=root)
    return digest({name: code_meaning(path) for name, path in files.items()})
