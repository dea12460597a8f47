"""The docs cannot rot: in README.md and docs/*.md every relative link (and #anchor) resolves, every
```python block runs and every ```yaml block loads. The conventions, including the
``<!-- docs-test: setup ... -->`` and ``<!-- docs-test: skip (reason) -->`` comments, are in docs/README.md.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from lightning_prune.core.trace import op_rules

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose Python blocks are not run yet, and why. Keep this empty where possible.
BLOCKS_NOT_RUN: dict[str, str] = {}

FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(setup|skip)\b(.*?)(-->)?\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")


@dataclass
class Block:
    """A fenced code block: its language, code, first code line (1-based) and docs-test directive."""

    language: str
    code: str
    line: int
    setup: str = ""
    skip: str | None = None


@dataclass
class Page:
    """A Markdown page split into its code blocks, its prose lines (code removed) and its heading slugs."""

    path: Path
    blocks: list[Block]
    prose: list[tuple[int, str]]
    anchors: set[str]

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix() if self.path.is_relative_to(ROOT) else self.path.name


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def parse(path: Path) -> Page:
    """Read ``path`` into blocks (with the directive comment just above each) and prose lines."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    anchors: set[str] = set()
    pending: tuple[str, str] | None = None  # (kind, text) of a docs-test comment awaiting its block
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        directive = DIRECTIVE.match(line)
        if fence:
            end = index + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            block = Block(fence.group(1), "\n".join(lines[index + 1 : end]), index + 2)
            if pending is not None:
                kind, text = pending
                if kind == "skip":
                    block.skip = text.strip().removeprefix("(").removesuffix(")").strip()
                else:
                    block.setup = text
            blocks.append(block)
            pending = None
            index = end + 1
            continue
        if directive:
            kind, rest = directive.group(1), directive.group(2)
            body = [rest]
            while directive.group(3) is None and not lines[index].rstrip().endswith("-->"):
                index += 1
                body.append(lines[index].rstrip().removesuffix("-->"))
            pending = (kind, textwrap.dedent("\n".join(body)))
        elif line.strip():
            pending = None
            prose.append((index + 1, line))
            heading = re.match(r"^#{1,6}\s+(.*)$", line)
            if heading:
                base = slug(heading.group(1))
                name, count = base, 1
                while name in anchors:  # GitHub numbers repeated headings: name, name-1, name-2
                    name, count = f"{base}-{count}", count + 1
                anchors.add(name)
        index += 1
    return Page(path, blocks, prose, anchors)


def broken_links(page: Page) -> Iterator[str]:
    """Every relative link of ``page`` that names no file, or a heading its page lacks."""
    for number, line in page.prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.path.parent / file_part).resolve() if file_part else page.path
            where = f"{page.name}:{number}: link ({target})"
            if not resolved.exists():
                yield f"{where} names {resolved}, which does not exist"
            elif anchor and resolved.suffix == ".md" and anchor not in parse(resolved).anchors:
                yield f"{where}: {resolved.name} has no heading with the anchor #{anchor}"


def run_blocks(page: Page) -> list[str]:
    """Run ``page``'s Python blocks in order in one namespace; return the skipped blocks' reasons."""
    namespace: dict = {"__name__": "__docs__"}
    skipped = []
    torch.manual_seed(0)
    for block in page.blocks:
        if block.language != "python":
            continue
        if block.skip is not None:
            if not block.skip:
                raise AssertionError(f"{page.name}:{block.line}: `docs-test: skip` needs a (reason)")
            skipped.append(f"{page.name}:{block.line} {block.skip}")
            continue
        if block.setup.strip():
            exec(compile(block.setup, f"{page.name}:{block.line} (setup)", "exec"), namespace)
        # Padding with newlines makes a traceback's line number the line in the Markdown page.
        exec(compile("\n" * (block.line - 1) + block.code, page.name, "exec"), namespace)
    return skipped


def _ids(pages: list[Path]) -> list[str]:
    return [path.relative_to(ROOT).as_posix() for path in pages]


def _with(language: str) -> list[Path]:
    return [path for path in PAGES if any(block.language == language for block in parse(path).blocks)]


@pytest.mark.parametrize("path", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(path: Path) -> None:
    problems = list(broken_links(parse(path)))
    assert not problems, "Fix or remove these links:\n" + "\n".join(problems)


PYTHON_PAGES = _with("python")


@pytest.mark.parametrize("path", PYTHON_PAGES, ids=_ids(PYTHON_PAGES))
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = parse(path)
    if page.name in BLOCKS_NOT_RUN:
        pytest.skip(BLOCKS_NOT_RUN[page.name])
    monkeypatch.chdir(tmp_path)
    # architecture.md teaches the tracer ops: a private copy of the table keeps them out of other tests
    monkeypatch.setattr(op_rules, "TABLE", dict(op_rules.TABLE))
    run_blocks(page)


YAML_PAGES = _with("yaml")


@pytest.mark.parametrize("path", YAML_PAGES, ids=_ids(YAML_PAGES))
def test_yaml_blocks_parse(path: Path) -> None:
    for block in parse(path).blocks:
        if block.language == "yaml":
            config = yaml.safe_load(block.code)
            assert isinstance(config, dict), f"{path.name}:{block.line}: not a YAML mapping"
            for class_path in class_paths(config):
                module, _, name = class_path.rpartition(".")
                assert hasattr(importlib.import_module(module), name), f"{path.name}:{block.line}: {class_path}"


def class_paths(config: object) -> Iterator[str]:
    """Every ``class_path`` in a LightningCLI configuration."""
    if isinstance(config, dict):
        if isinstance(config.get("class_path"), str):
            yield config["class_path"]
        for value in config.values():
            yield from class_paths(value)
    elif isinstance(config, list):
        for value in config:
            yield from class_paths(value)


def test_the_checks_catch_a_broken_link_a_bad_block_and_a_missing_reason(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Loading the checkpoint\n\n[ok](#loading-the-checkpoint) [gone](missing.md) [anchor](#no-such-heading)\n\n"
        "<!-- docs-test: setup\nwidth = 4\n-->\n```python\nassert width == 4\n```\n\n"
        "<!-- docs-test: skip (needs a GPU) -->\n```python\nraise SystemExit\n```\n\n"
        "```python\nprint(widht)\n```\n",
        encoding="utf-8",
    )
    parsed = parse(page)
    problems = list(broken_links(parsed))
    assert len(problems) == 2 and "missing.md" in problems[0] and "#no-such-heading" in problems[1]
    with pytest.raises(NameError, match="widht"):
        run_blocks(parsed)
    parsed.blocks[-1].code = "print(width)"
    assert run_blocks(parsed) == ["page.md:14 needs a GPU"]
    parsed.blocks[1].skip = ""
    with pytest.raises(AssertionError, match=r"page.md:14: `docs-test: skip` needs a \(reason\)"):
        run_blocks(parsed)
    assert slug("Deploying: whole channels, rounded widths, ONNX and torch.export") == (
        "deploying-whole-channels-rounded-widths-onnx-and-torchexport"
    )
    assert slug("The `inplace_dict`") == "the-inplace_dict"
