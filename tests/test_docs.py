"""The README and docs/: every relative link resolves to a file and, with an #anchor, to one of its
headings; the README stays one screen and links every page of docs/; an engine key's default that a
page names is the one conf/ holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 200
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
ENGINE_DEFAULT = re.compile(r"`engine\.(\w+)` \(([^()\s]+)\)")  # `engine.shards_in_flight` (2)
# keys that one backend reads: the default a page names is its conf/engine file's (the other files
# hold the schema's default, unused)
BACKEND_OF = {"max_concurrency": "openai", "max_retries": "openai", "request_timeout": "openai"}


def prose(text: str) -> str:
    """`text` without fenced code blocks: a `#` line there is a comment, `](` is not a link."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but hyphens and spaces
    dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and code spans."""
    return LINK.findall(CODE_SPAN.sub("", prose(path.read_text(encoding="utf-8"))))


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken(path: Path) -> list[str]:
    """Each relative link of `path` whose file does not exist or whose anchor is no heading of it."""
    bad = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.is_file():
            bad.append(f"{target} (no file {shown(dest)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {shown(dest)})")
    return bad


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Which defaults are faithful", "which-defaults-are-faithful"),
        ("13. Translations the release lacks; DeepL", "13-translations-the-release-lacks-deepl"),
        ("`make demo` and `make test` on a clone", "make-demo-and-make-test-on-a-clone"),
        ("Failure semantics: one bad row", "failure-semantics-one-bad-row"),
        ("Left out, or an extension (the LLM or DeepL)", "left-out-or-an-extension-the-llm-or-deepl"),
        ("Self-hosted servers", "self-hosted-servers"),
    ],
)
def test_slug_follows_github(heading: str, expected: str):
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_found(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Title\n\n## Part one\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#part-one) [self](#b) [bad anchor](a.md#part-two) [no file](c.md) [web](https://x.org)\n"
        "```\n# not a heading [nor](d.md)\n```\n# B\n",
        encoding="utf-8",
    )
    assert [b.split(" ")[0] for b in broken(page)] == ["a.md#part-two", "c.md"]


@pytest.mark.parametrize("page", PAGES, ids=shown)
def test_every_relative_link_resolves(page: Path):
    assert page.is_file()
    bad = broken(page)
    assert not bad, f"{shown(page)} has broken links:\n" + "\n".join(bad)


def test_readme_is_one_screen():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_readme_links_every_page_of_docs():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not EXTERNAL.match(t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


def engine_defaults(path: Path) -> list[tuple[str, str]]:
    """(key, value) of each `engine.<key>` (<value>) in the prose of `path`."""
    return ENGINE_DEFAULT.findall(prose(path.read_text(encoding="utf-8")))


def test_an_engine_default_is_found_in_prose():
    page = "`engine.replicas` (null) is, `engine.ray_max_retries` (3) times, `engine.cache` (see below)"
    assert ENGINE_DEFAULT.findall(page) == [("replicas", "null"), ("ray_max_retries", "3")]


@pytest.mark.parametrize("page", PAGES, ids=shown)
def test_the_engine_defaults_a_page_names_are_conf_s(page: Path):
    files = {
        p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in (ROOT / "conf/engine").glob("*.yaml")
    }
    wrong = []
    for key, value in engine_defaults(page):
        backends = [BACKEND_OF[key]] if key in BACKEND_OF else sorted(files)
        held = {backend: files[backend].get(key, "<missing>") for backend in backends}
        if any(v != yaml.safe_load(value) for v in held.values()):
            wrong.append(f"`engine.{key}` ({value}), but conf/engine holds {held}")
    assert not wrong, f"{shown(page)} names defaults that conf/ does not hold:\n" + "\n".join(wrong)


def test_the_supported_pythons_are_the_same_in_readme_pyproject_and_the_digest_test():
    """README's "Needs Python 3.11, 3.12 or 3.13" is what pyproject declares (requires-python and its
    classifiers) and what tests/test_resume.py computes the code digest under."""
    import tomllib

    from tests.test_resume import SUPPORTED_PYTHONS

    named = re.search(r"Needs Python ([\d.]+(?:, [\d.]+)* or [\d.]+)", README.read_text(encoding="utf-8"))
    assert named, "README.md no longer says which Pythons it needs"
    in_readme = tuple(re.findall(r"3\.\d+", named.group(1)))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    classified = tuple(
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert in_readme == classified == SUPPORTED_PYTHONS
    assert project["requires-python"] == f">={SUPPORTED_PYTHONS[0]}"
