"""Prompt templates and message builders: stages/prompts/<name>.txt (`string.Template`, $fields), and
the judge prompt the release ships (score.prompt `published`): the single-answer 0-10 entry of the
fetched materials/judge_prompt.jsonl, read as MT-Bench's llm_judge format (an assumption: the file's
schema cannot be read from here, docs/assumptions.md 6) once per process while the file is unchanged.
A file of another shape raises one line naming the keys it holds and the fix."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from string import Template

from stages.core.config.errors import PipelineError, SourceError
from stages.core.config.params import PARAMS_FILE, load_params
from stages.core.config.variant_params import PUBLISHED_PROMPT

LOG = logging.getLogger(__name__)
PROMPT_DIR = Path(__file__).resolve().parents[2] / "prompts"
PUBLISHED = PUBLISHED_PROMPT  # score.prompt: the judge prompt of the fetched release, not a template
PUBLISHED_FILE = "materials/judge_prompt.jsonl"  # under paths.released (fetch.released.include lists it)
OURS = "judge-0to10"  # the judge prompt of ours that an error names as the fix
# MT-Bench's llm_judge format (FastChat's data/judge_prompts.jsonl): one JSON object a line with these
# keys (and `description`, `category`, not read); tools key the file's prompts by `name`
JUDGE_KEYS = ("name", "type", "system_prompt", "prompt_template", "output_format")
SINGLE = {"type": "single", "output_format": "[[rating]]"}  # a single-answer prompt asking "[[k]]"
SINGLE_NAME = "single-v1"  # MT-Bench's general single-answer prompt: taken first where the file has it
FIELDS = {"question", "answer"}  # what a single-answer prompt_template takes, as str.format fields
SHOWN = 20  # keys an error names at most
FIX = (
    f"set models.<variant>.score.prompt: {OURS} (our prompt, stages/prompts/{OURS}.txt) where it is published"
)


class JudgePromptError(SourceError):
    """The release's judge prompt file is missing, or has a shape this project does not read."""


@dataclass(frozen=True)
class JudgePrompt:
    """The single-answer entry chosen from the release's judge prompt file, and that file."""

    name: str
    system_prompt: str
    prompt_template: str  # str.format fields {question} and {answer}, as MT-Bench renders it
    path: str
    sha256: str  # of the file's bytes

    @property
    def text(self) -> str:
        """All the judge's requests hold but the question and the answer (a resume key covers it)."""
        texts = {"system_prompt": self.system_prompt, "prompt_template": self.prompt_template}
        return json.dumps(texts, ensure_ascii=False, sort_keys=True)

    def messages(self, question: str, answer: str) -> list[dict[str, str]]:
        """The system message (where the entry has one) and the user turn with question and answer."""
        user = self.prompt_template.format(question=question, answer=answer)
        return with_system(self.system_prompt, [{"role": "user", "content": user}])


def template(name: str) -> Template:
    """Load stages/prompts/<name>.txt; an unknown name raises listing the available ones. `published`:
    the release's judge prompt as one text (`JudgePrompt.text`), what keys cover; `judge_messages`
    renders it."""
    if name == PUBLISHED:
        return Template(published_judge().text)
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        names = sorted(p.name.removesuffix(".txt") for p in PROMPT_DIR.iterdir() if p.name.endswith(".txt"))
        raise PipelineError(f"prompt {name!r} not found in {PROMPT_DIR}; available: {', '.join(names)}")
    return _load(path)


@functools.cache
def _load(path: Path) -> Template:
    return Template(path.read_text(encoding="utf-8").strip())


def user_turn(name: str, **fields: str) -> list[dict[str, str]]:
    """One user message rendered from template `name`."""
    if name == PUBLISHED:
        raise PipelineError(f"prompt {PUBLISHED!r} is the judge's only (models.<variant>.score.prompt)")
    return [{"role": "user", "content": template(name).substitute(**fields)}]


def with_system(system_prompt: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


def published_judge(released_root: str | Path | None = None) -> JudgePrompt:
    """The judge prompt of score.prompt `published`, from PUBLISHED_FILE under `released_root`
    (default: paths.released of the params file the stage loaded, which every process of a stage
    reads), read and checked once per process while the file is unchanged."""
    root = Path(released_root) if released_root is not None else _released_root()
    path = root / PUBLISHED_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise JudgePromptError(
            f"{path} does not exist: run `dvc repro fetch` with {PUBLISHED_FILE} in fetch.released.include "
            f"(conf/source/), or {FIX}"
        ) from None
    return _read_once(str(path), path.resolve(), stat.st_mtime_ns, stat.st_size)


def _released_root() -> Path:
    params = Path(PARAMS_FILE)
    return _params_released(params.resolve(), params.stat().st_mtime_ns if params.is_file() else 0)


@functools.cache
def _params_released(params: Path, mtime_ns: int) -> Path:
    return Path(load_params(params).paths.released)


@functools.cache
def _read_once(shown: str, path: Path, mtime_ns: int, size: int) -> JudgePrompt:
    return read_judge_prompt(Path(shown))


def read_judge_prompt(file: Path, fix: str = FIX, name: str | None = None) -> JudgePrompt:
    """The single-answer 0-10 entry of an MT-Bench judge prompt file (named `name` in messages, default
    its path): `single-v1` where it fits, else the first entry with type `single`, output_format
    `[[rating]]` and a prompt_template taking {question} and {answer} only (the log names the one
    taken). JudgePromptError, one line naming the keys found and `fix`, where the file has another
    shape or no such entry."""
    data, path = file.read_bytes(), name or str(file)
    prompts = _objects(path, data, fix)
    fitting = [p for p in prompts if all(p[k] == v for k, v in SINGLE.items()) and _fields(p) == FIELDS]
    if not fitting:
        found = "; ".join(
            f"{p['name']} (type {p['type']}, {p['output_format']}, {_shown_fields(p)})" for p in prompts
        )
        raise JudgePromptError(
            _line(
                f"{path}: no single-answer prompt (type single, output_format [[rating]], a prompt_template "
                f"taking {{question}} and {{answer}} only) among its {len(prompts)}: {found}; {fix}"
            )
        )
    chosen = next((p for p in fitting if p["name"] == SINGLE_NAME), fitting[0])
    sha256 = hashlib.sha256(data).hexdigest()
    LOG.info(
        "judge prompt %s of %s (sha256 %s): type single, output_format [[rating]]; %s; its prompts: %s",
        chosen["name"],
        path,
        sha256,
        f"taken by its name {SINGLE_NAME}" if chosen["name"] == SINGLE_NAME else "the first that fits",
        ", ".join(p["name"] for p in prompts),
    )
    return JudgePrompt(chosen["name"], chosen["system_prompt"], chosen["prompt_template"], path, sha256)


def _objects(path: str, data: bytes, fix: str) -> list[dict]:
    """The file's JSON objects, each with every JUDGE_KEYS as a string; else JudgePromptError."""
    expected = f"not an MT-Bench judge prompt file (one JSON object a line with {', '.join(JUDGE_KEYS)})"
    try:
        values = _json_values(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise JudgePromptError(_line(f"{path}: {expected}: not JSON lines ({err}); {fix}")) from None
    objects = [v for v in values if isinstance(v, dict)]
    keys = sorted({str(k) for o in objects for k in o})
    lacking = [k for k in JUDGE_KEYS if not all(isinstance(o.get(k), str) for o in objects)]
    if not values or len(objects) < len(values) or lacking:
        held = f"{len(values) - len(objects)} of {len(values)} JSON values not objects, " if values else ""
        shown = ", ".join(keys[:SHOWN]) + (f" ... ({len(keys)} keys)" if len(keys) > SHOWN else "")
        lack = f"; lacking (as text): {', '.join(lacking)}" if lacking else ""
        why = f"{held}keys found: {shown or 'none'}{lack}"
        raise JudgePromptError(_line(f"{path}: {expected}: {why}; {fix}"))
    return objects


def _json_values(text: str) -> list:
    """One JSON value per non-blank line; where a line is no JSON, the whole text as one JSON value
    (a list gives its items), so that a pretty-printed file is named by its keys too."""
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]


def _fields(prompt: dict) -> set[str] | str:
    """The str.format fields of an entry's prompt_template (with any conversion or format spec), or
    why it cannot be formatted."""
    try:
        parsed = list(string.Formatter().parse(prompt["prompt_template"]))
    except ValueError as err:
        return f"prompt_template not a format string: {err}"
    return {
        name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        for _, name, spec, conversion in parsed
        if name is not None
    }


def _shown_fields(prompt: dict) -> str:
    fields = _fields(prompt)
    return fields if isinstance(fields, str) else f"fields {', '.join(sorted(fields)) or 'none'}"


def _line(message: str) -> str:
    """`message` on one line, whatever the file's keys and values hold."""
    return " ".join(message.split())
