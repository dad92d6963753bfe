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

import hashlib
import json

import pyarrow as pa
from pydantic import BaseModel

from stages.core.storage.meaning import (  # noqa: F401 - re-exported: the resume keys' code part
    PACKAGE,
    PACKAGE_DIR,
    _imports,
    closure,
    code_digest,
    code_meaning,
    digest,
    module_file,
)

DIGEST_ROWS = 512  # rows turned into Python objects at a time by input_digest


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
