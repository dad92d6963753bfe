"""Compose conf/ (Hydra) into params.yaml, the only file stages read; validate it first.

python -m stages.compose                  # production release config
python -m stages.compose profile=sample   # bundled sample, CPU, offline
python -m stages.compose models.gemma3.generate.n_ja=4 --out params.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=sample")
    parser.add_argument("--out", type=Path, default=PARAMS_FILE)
    args = parser.parse_args()
    args.out.write_text(compose_params(args.overrides), encoding="utf-8")
    print(f"wrote {args.out} ({' '.join(args.overrides) or 'production'})")


if __name__ == "__main__":
    run(main)
