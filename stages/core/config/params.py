"""params.yaml as one typed model (Params, of the models of stages/core/config/*_params.py and
paths.py), and its loading: every stage loads and validates the whole file before any work."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from stages.core.config.engine_params import EngineParams, LLMSpec
from stages.core.config.errors import PipelineError
from stages.core.config.paths import Paths
from stages.core.config.release_params import SFT_NAME, PublishedParams, ReleaseParams, SftOption
from stages.core.config.schema import COMMIT, Strict
from stages.core.config.source_params import DecryptParams, FetchParams, SourceSpec
from stages.core.config.translate_params import TranslateParams
from stages.core.config.variant_params import VariantParams

PARAMS_FILE = Path(os.environ.get("LMSYS_SYNTH_PARAMS", "params.yaml"))
VARIANT_NAME = r"^[a-z][a-z0-9_]*$"
RELEASE_PROFILE = "production"  # its sources must be pinned to commits


class ParamsError(PipelineError, ValueError):
    """params.yaml is missing, malformed, or holds a value of the wrong type or an unknown key."""


class Params(Strict):
    profile: str
    seed: int
    paths: Paths
    fetch: FetchParams
    decrypt: DecryptParams
    translate: TranslateParams
    engine: EngineParams
    release: ReleaseParams
    models: dict[str, VariantParams] = Field(min_length=1)
    sft: dict[str, SftOption] = {}  # SFT option sets by name (stages/sft.py)
    published: PublishedParams  # the published release files (compare, generate.source=published)

    @field_validator("models")
    @classmethod
    def _variant_names(cls, models: dict[str, VariantParams]) -> dict[str, VariantParams]:
        bad = [name for name in models if not re.match(VARIANT_NAME, name)]
        if bad:
            raise ValueError(f"variant names must match {VARIANT_NAME}: {bad}")
        return models

    @model_validator(mode="after")
    def _release_pins_and_subset(self) -> Params:
        if self.profile == RELEASE_PROFILE:
            for key in ("source", "released"):
                spec: SourceSpec = getattr(self.fetch, key)
                if spec.uri.startswith("hf://") and not re.fullmatch(COMMIT, spec.revision or ""):
                    raise ValueError(
                        f"fetch.{key}.revision={spec.revision!r}: a release config must pin a 40-hex "
                        "commit, not a branch or tag"
                    )
            for key, llm in self.llms().items():
                if not Path(llm.model).exists() and not re.fullmatch(COMMIT, llm.revision or ""):
                    raise ValueError(
                        f"{key}.revision={llm.revision!r}: a release config must pin {llm.model} to a "
                        "40-hex Hub commit, so that the release records which weights produced it"
                    )
        used = {variant.subset for variant in self.models.values()}
        listed = self.decrypt.subsets
        if len(set(listed)) != len(listed) or set(listed) != used:
            uses = ", ".join(f"models.{name}.subset={v.subset}" for name, v in self.models.items())
            raise ValueError(
                f"decrypt.subsets={listed} must list each subset the variants use once ({uses}): "
                f"use {sorted(used)}"
            )
        return self

    @model_validator(mode="after")
    def _key_script_pins_agree(self) -> Params:
        key, fetched = self.decrypt.key, self.fetch.released.sha256
        # decrypt.key.sha256 is the pin that decrypt checks; fetch.released.sha256 may pin the script
        # too (fetch then refuses other bytes), but never to other bytes
        if key.method == "script" and key.script in fetched and fetched[key.script] != key.sha256:
            raise ValueError(
                f"fetch.released.sha256[{key.script!r}]={fetched[key.script]} differs from "
                f"decrypt.key.sha256={key.sha256}: pin the script's bytes in decrypt.key.sha256 only"
            )
        return self

    @model_validator(mode="after")
    def _sft_fits_its_variants(self) -> Params:
        for name, option in self.sft.items():
            if not re.match(SFT_NAME, name):
                raise ValueError(f"sft.{name}: an option set's name must match {SFT_NAME}")
            unknown = sorted(set(option.variants or []) - set(self.models))
            if unknown:
                raise ValueError(f"sft.{name}.variants: unknown {unknown}; models: {list(self.models)}")
            for variant in option.variants or list(self.models):
                spec = self.models[variant]
                if option.turns == 2 and spec.second_turn is None:
                    raise ValueError(
                        f"sft.{name}.turns=2: variant {variant} has no second turn (models.{variant}."
                        f"second_turn is null); set sft.{name}.variants to variants that have one"
                    )
                if option.language == "en" and spec.generate.n_en == 0:
                    raise ValueError(
                        f"sft.{name}.language=en: variant {variant} has no English responses (models."
                        f"{variant}.generate.n_en is 0); set sft.{name}.variants to variants that have them"
                    )
        return self

    @model_validator(mode="after")
    def _published_pinned(self) -> Params:
        spec = self.published
        hub = self.profile == RELEASE_PROFILE and spec.uri.startswith("hf://")
        if hub and not re.fullmatch(COMMIT, spec.revision or ""):
            raise ValueError(
                f"published.revision={spec.revision!r}: a release config must pin a 40-hex commit, "
                "not a branch or tag"
            )
        card = spec.card
        if card is None or card.uri != spec.uri:
            return self  # files of another release (the sample's): compare@M names a missing one
        for name, variant in self.models.items():
            reads = [
                key
                for key, on in (
                    ("compare", variant.compare),
                    ("annotations", variant.annotations == "published"),
                    ("generate.source", variant.generate.source == "published"),
                )
                if on
            ]
            if reads and variant.release_name not in card.files:
                raise ValueError(
                    f"{', '.join(f'models.{name}.{key}' for key in reads)}: {spec.uri} published no file "
                    f"for release_name {variant.release_name!r} "
                    f"(its files: {', '.join(sorted(card.files))}). A variant of your own has nothing "
                    "published: set `compare: false` and `annotations: ours` (and generate.source: engine) "
                    f"in conf/model/{name}.yaml, then python -m stages.compose"
                )
        return self

    def llms(self) -> dict[str, LLMSpec]:
        """Every model the pipeline runs, by its params key."""
        found = {"translate.llm": self.translate.llm}
        for name, variant in self.models.items():
            found[f"models.{name}.generate.llm"] = variant.generate.llm
            found[f"models.{name}.score.llm"] = variant.score.llm
        return found

    def variant(self, name: str) -> VariantParams:
        if name not in self.models:
            raise ParamsError(f"unknown variant {name!r}; params.yaml models: {', '.join(self.models)}")
        return self.models[name]

    def release_stem(self, name: str) -> str:
        """The stem of a variant's public release files: release.file with its release_name."""
        return self.release.file.format(name=self.variant(name).release_name)


SECRET_KEY = re.compile(r"(?i)(token|key|password|passphrase|secret)")  # a key named like a secret


def _describe(err: ValidationError, source: Path) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"])
        got = (
            "" if item["type"] == "missing" or not item["loc"] else f" (got {_shown(key, item.get('input'))})"
        )
        lines.append(f"  {key or '<params>'}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def _shown(key: str, value: object) -> str:
    """A bad value as an error may show it: withheld where the key is named like a secret, or where the
    value is that of an environment variable (it may have come from one)."""
    text = str(value)
    from_env = len(text) >= 8 and any(text == v or (len(v) >= 8 and v in text) for v in os.environ.values())
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]) or from_env:
        return "a value withheld: the key is named like a secret or the value is an environment variable's"
    return repr(value)


def validate(data: dict, source: Path = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming each bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run `python -m stages.compose` to write it")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return validate(data, path)
