"""Compose conf/ (Hydra) into params.yaml, the only file stages read; validate it first.

python -m stages.compose                  # production release config
python -m stages.compose profile=sample   # bundled sample, CPU, offline
python -m stages.compose models.gemma3.generate.n_ja=4 --out params.yaml
python -m stages.compose --check          # is params.yaml a composition of conf/? (exit 1 if not)

`dvc exp run -S key=value` composes conf/ itself and writes params.yaml without our header; `--check`
accepts such a file when it equals the composition of its profile with its differing values as
overrides, and names those overrides.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stages.core.cli import run
from stages.core.errors import PipelineError
from stages.core.params import PARAMS_FILE, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HEADER = "# Written by `python -m stages.compose{args}`: edit conf/ and re-run it, never this file.\n"


def compose_params(overrides: list[str], conf_dir: Path = CONF_DIR) -> str:
    """Return the params.yaml text for these Hydra overrides, validated (unknown keys are refused)."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's message names the option or key and lists the allowed ones; its search path is noise
        text = str(err).split("\nConfig search path:")[0].strip()
        raise PipelineError(
            f"cannot compose conf/ with {' '.join(overrides) or 'no overrides'}: {text}"
        ) from err
    data = OmegaConf.to_container(cfg)
    validate(data, Path("<composition of conf/>"))
    args = "".join(f" {o}" for o in overrides)
    return HEADER.format(args=args) + OmegaConf.to_yaml(cfg)


HEADER_RE = re.compile("^" + re.escape(HEADER.split("{args}")[0]) + r"(?P<args>[^`]*)`")


def _leaves(data, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf (an empty dict or list is a leaf)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _override(key: str, value: object) -> str:
    """A Hydra override that sets `key` to `value` (flow-style YAML is valid override grammar)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    return f"{key}={text}"


def check_params(path: Path = PARAMS_FILE, conf_dir: Path = CONF_DIR) -> list[str]:
    """The overrides that make `path` a composition of conf/; PipelineError when no overrides can.

    With our header, the file must equal the composition of the header's overrides. Without it
    (`dvc exp run -S` writes the composition bare), the file must equal the composition of its
    `profile` plus one value override per differing leaf: a key that conf/ lacks, or one conf/ has and
    the file lacks (a stale file, or a group choice such as `engine=openai`), is refused by name.
    """
    text = path.read_text(encoding="utf-8")
    header = HEADER_RE.match(text)
    if header:
        overrides = header["args"].split()
        if text != compose_params(overrides, conf_dir):
            raise PipelineError(f"{path} is stale: run `python -m stages.compose {' '.join(overrides)}`")
        return overrides
    data = yaml.safe_load(text)
    profile = data.get("profile", "production") if isinstance(data, dict) else "production"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=sample")
    parser.add_argument("--out", type=Path, default=PARAMS_FILE)
    parser.add_argument("--check", action="store_true", help="check --out instead of writing it")
    args = parser.parse_args()
    if args.check:
        overrides = check_params(args.out)
        print(f"{args.out} is the composition of conf/ with {' '.join(overrides) or 'no overrides'}")
        sys.exit(0)
    args.out.write_text(compose_params(args.overrides), encoding="utf-8")
    print(f"wrote {args.out} ({' '.join(args.overrides) or 'production'})")


if __name__ == "__main__":
    run(main)
