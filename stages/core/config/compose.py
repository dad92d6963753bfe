"""Compose conf/ (Hydra) into params.yaml and check that params.yaml is a composition of conf/: the
overrides it records, those a new composition would drop, and the refusal to drop them silently."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stages.core.config.errors import PipelineError
from stages.core.config.params import PARAMS_FILE, load_params, validate

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
HEADER = "# Written by `python -m stages.compose{args}`: edit conf/ and re-run it, never this file.\n"


# an interpolation that calls a resolver (`${oc.env:HF_TOKEN}`, `${oc.decode:...}`, any custom one), not
# one that names another key (`${paths.data}`): params.yaml is git-tracked, so nothing may read the
# environment into it
RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")


def refuse_resolvers(overrides: list[str], cfg: object = None) -> None:
    """Raise naming the override or conf key whose value calls a resolver (reads the environment,
    decodes, ...): its value would land in the git-tracked params.yaml. The value is never shown."""
    for override in overrides:
        key, _, value = override.partition("=")
        if RESOLVER.search(value):
            raise PipelineError(
                f"override {key.lstrip('+~')}: an interpolation that calls a resolver (such as oc.env) "
                "would write what it reads into git-tracked params.yaml; give the value itself (a "
                "secret belongs in the environment of the stage that reads it, never in params)"
            )
    if cfg is not None:
        for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)).items():
            if isinstance(value, str) and RESOLVER.search(value):
                raise PipelineError(
                    f"conf/ key {key}: an interpolation that calls a resolver (such as oc.env) would write "
                    "what it reads into git-tracked params.yaml; give the value itself"
                )


def compose_params(overrides: list[str], conf_dir: Path = CONF_DIR) -> str:
    """Return the params.yaml text for these Hydra overrides, validated (unknown keys are refused;
    resolver interpolations too: `refuse_resolvers`)."""
    refuse_resolvers(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        refuse_resolvers([], cfg)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's message names the option or key and lists the allowed ones; its search path is noise
        text = str(err).split("\nConfig search path:")[0].strip()
        raise PipelineError(
            f"cannot compose conf/ with {' '.join(overrides) or 'no overrides'}: {text}"
        ) from err
    data = OmegaConf.to_container(cfg)
    validate(data, Path("<composition of conf/>"))
    args = "".join(f" {shlex.quote(o)}" for o in overrides)
    return HEADER.format(args=args) + OmegaConf.to_yaml(cfg)


HEADER_RE = re.compile("^" + re.escape(HEADER.split("{args}")[0]) + r"(?P<args>[^`]*)`")


def _read(path: Path) -> tuple[list[str] | None, str]:
    """The overrides `path`'s header records (None without one) and its text; PipelineError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        header = HEADER_RE.match(text)
        return (shlex.split(header["args"]) if header else None), text
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or unbalanced quotes in the header
        raise PipelineError(f"{path} is unreadable: {err}") from err


def _leaves(data, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf (an empty dict or list is a leaf)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _flow(value: object) -> str:
    """`value` as flow-style YAML, which is valid override grammar."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _override(key: str, value: object) -> str:
    """A Hydra override that sets `key` to `value`."""
    return f"{key}={_flow(value)}"


def check_params(path: Path = PARAMS_FILE, conf_dir: Path = CONF_DIR) -> list[str]:
    """The overrides that make `path` a composition of conf/; PipelineError when no overrides can.

    With our header, the file must equal the composition of the header's overrides. Without it
    (`dvc exp run -S` writes the composition bare), the file must equal the composition of its
    `profile` plus one value override per differing leaf: a key that conf/ lacks, or one conf/ has and
    the file lacks (a stale file, or a group choice such as `engine=openai`), is refused by name.
    """
    overrides, text = _read(path)
    if overrides is not None:
        if text != compose_params(overrides, conf_dir):
            load_params(path)  # an unknown key or a bad value: named, with its key
            raise PipelineError(f"{path} is stale or edited by hand: run `{_command(overrides)}`")
        return overrides
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not YAML: {err}") from err
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a composition of conf/: not a YAML mapping")
    profile = data.get("profile", "production")
    base_overrides = [] if profile == "production" else [f"profile={profile}"]
    base = _leaves(yaml.safe_load(compose_params(base_overrides, conf_dir)))
    ours = _leaves(data)
    extra, missing = sorted(set(ours) - set(base)), sorted(set(base) - set(ours))
    if extra or missing:
        raise PipelineError(
            f"{path} is not a composition of conf/ with profile={profile}: "
            + "; ".join(
                part
                for part in (
                    f"keys conf/ lacks: {', '.join(extra)}" if extra else "",
                    f"keys it lacks: {', '.join(missing)}" if missing else "",
                )
                if part
            )
            + ". Re-run `python -m stages.compose <overrides>` (group choices such as engine=openai included)"
        )
    overrides = base_overrides + [_override(k, ours[k]) for k in sorted(ours) if ours[k] != base[k]]
    composed = yaml.safe_load(compose_params(overrides, conf_dir))
    if composed != data:
        raise PipelineError(f"{path} differs from the composition of conf/ with {' '.join(overrides)}")
    return overrides


def recorded_overrides(path: Path, conf_dir: Path = CONF_DIR) -> list[str]:
    """The overrides `path` records ([] when there is no file); PipelineError when it cannot tell.

    With our header, the header's: the command that wrote the file (a conf/ change since then makes
    the file stale, not its overrides unknown). Without it, those `check_params` derives.
    """
    if not path.exists():
        return []
    overrides, _ = _read(path)
    return overrides if overrides is not None else check_params(path, conf_dir)


def _effects(overrides: list[str]) -> dict[str, tuple[str, str]]:
    """Key -> (override, the value it sets as Hydra parses it: `0.70` as `0.7`); of a key, the last wins."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise PipelineError(f"cannot parse the overrides {shlex.join(overrides)}: {err}") from err
    return {
        ("~" if o.is_delete() else "") + o.key_or_group + (f"@{o.package}" if o.package else ""): (
            o.input_line,
            _flow(o.value()),
        )
        for o in parsed
    }


def dropped_overrides(recorded: list[str], overrides: list[str]) -> dict[str, str | None]:
    """Each recorded override that `overrides` does not repeat -> the one setting its key now, or None."""
    new = _effects(overrides)
    return {
        line: new[key][0] if key in new else None
        for key, (line, value) in _effects(recorded).items()
        if new.get(key, (None, None))[1] != value
    }


def _command(overrides: list[str], *flags: str) -> str:
    return shlex.join(["python", "-m", "stages.compose", *overrides, *flags])


def dropped_or_refuse(out: Path, overrides: list[str], drop: bool) -> str:
    """A line naming the overrides `out` records that a composition with `overrides` drops ("" for
    none); PipelineError naming them and the ways out, unless `drop`. A file whose overrides cannot
    be told (unreadable, or a header-less file that is no composition of conf/) is refused too.
    """
    flags = [] if out == PARAMS_FILE else ["--out", str(out)]
    try:
        dropped = dropped_overrides(recorded_overrides(out), overrides)
    except PipelineError as err:
        if drop:
            return f"replaced {out}, whose overrides cannot be told: {err}"
        raise PipelineError(
            f"cannot tell which overrides {out} records, so it is kept: {err}\n"
            f"Replace it with `{_command(overrides, *flags, '--drop-overrides')}`."
        ) from err
    if dropped and not drop:
        lines = [f"  {o}" + (f"  (this command sets {new})" if new else "") for o, new in dropped.items()]
        kept = [o for o, new in dropped.items() if new is None]
        raise PipelineError(
            "\n".join(
                [f"{out} records overrides that this command drops:", *lines]
                + ([f"Keep them: `{_command(overrides + kept, *flags)}`"] if kept else [])
                + [
                    f"Drop them: `{_command(overrides, *flags, '--drop-overrides')}`",
                    "A lasting change belongs in conf/, not in an override.",
                ]
            )
        )
    return f"dropped the overrides {out} recorded: {shlex.join(dropped)}" if dropped else ""
