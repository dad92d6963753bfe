"""Resume keys: what a long stage's checkpoints are keyed by, so finished work is reused exactly
when it would be computed again the same way.

The contract. A shard checkpoint is reused only when everything that determines its rows is
unchanged, and whatever does not determine them never throws it away:

- the *stage key* (the checkpoint directory) covers the params that change results (sampling,
  n, seeds, prompts by their text, chat rules, max_model_len, dtype), the code of the stage (a
  digest of the AST, docstrings aside, of the entry module and every project module it imports at
  module level: comments and docstrings never throw a checkpoint away), the model
  id and its pinned revision, and the engine: backend, library name and version, and the code
  of the engine module;
- the *input digest* of each shard (stored in the shard's Parquet metadata) covers the content
  of exactly the input columns the stage reads for those rows, so an edit upstream that the
  stage does not read (a template rule, a column it ignores) changes nothing, and a changed
  row invalidates only its own shard;
- runtime knobs are excluded: fields marked `runtime` in the params schema (endpoints,
  concurrency, batch size, memory utilisation, parallel layout, shard size, retries, timeouts).
"""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from importlib import util
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel

PACKAGE = "stages"
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the `stages` package on disk
DIGEST_ROWS = 512  # rows turned into Python objects at a time by input_digest
# CPython 3.11 can fail two threads parsing at once ("SystemError: AST constructor recursion depth
# mismatch"): every parse and dump of this module holds this lock
_AST_LOCK = threading.Lock()


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def recipe(model: BaseModel) -> dict:
    """The fields of a params model that change results, recursively: runtime fields dropped, and
    OMIT_DEFAULT fields while they hold their default."""
    out = {}
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra or {}
        value = getattr(model, name)
        if extra.get("runtime") or (extra.get("omit_default") and value == info.default):
            continue
        out[name] = recipe(value) if isinstance(value, BaseModel) else _plain(value)
    return out


def _plain(value: object) -> object:
    if isinstance(value, BaseModel):
        return recipe(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


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
    with _AST_LOCK:
        dumped = ast.dump(tree)
    return hashlib.sha256(dumped.encode("utf-8")).hexdigest()


def code_digest(entry: str, root: Path | None = None) -> str:
    """A digest of the code (code_meaning) of `entry` and the project modules it imports at module
    level: a comment or docstring edit keeps every checkpoint, a change to what runs does not."""
    files = closure(entry, root=root)
    return digest({name: code_meaning(path) for name, path in files.items()})


def input_digest(table: pa.Table) -> str:
    """A digest of a shard's input rows (the columns the stage reads), independent of how they
    are chunked or encoded in Parquet."""
    digest_ = hashlib.sha256()
    for name in table.column_names:
        digest_.update(name.encode("utf-8") + b"\0")
        for start in range(0, table.num_rows, DIGEST_ROWS):  # a few rows at a time: bounded memory
            for value in table[name].slice(start, DIGEST_ROWS).to_pylist():
                digest_.update(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    return digest_.hexdigest()[:32]
