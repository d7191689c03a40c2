"""The README and docs/*.md point only at what the repository holds.

Every Markdown link (inline, image or reference definition) that is not a web
URL must resolve, from the file it is in, to a file or folder inside the
repository; an ``#anchor`` must name a heading of the Markdown file it points
into. Every backticked path that starts with a top-level entry of the
repository (``server/...``, ``deploy/...``, ``Makefile``) or with ``./`` or
``../``, and every backticked module of ours (``loadtests.bench.startup``),
must exist too. Nothing may point outside the repository: no ``../shared``, no
absolute link targets. Fenced code blocks are not checked.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WEB = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
MODULE = re.compile(r"^(server|adapters_store|loadtests|tests)(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_]*)?$")
FILE_SUFFIXES = {"py", "md", "json", "yaml", "yml", "toml", "txt", "c", "h", "sh", "png", "cfg", "ini"}
PLACEHOLDER = re.compile(r"[<>{}*$]|\.\.\.")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def top_level() -> frozenset[str]:
    """What a backticked repository path starts with: the repository's top-level files and folders."""
    return frozenset(p.name for p in ROOT.iterdir() if not p.name.startswith(".") and not p.name.endswith(".egg-info"))


def blocks(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each paragraph outside fenced code blocks; inline code and links never
    cross a blank line, but may cross a line break."""
    fenced, start, lines = False, 0, []
    for number, line in enumerate([*text.splitlines(), ""], 1):
        if FENCE.match(line):
            fenced = not fenced
            line = ""
        if fenced or not line.strip():
            if lines:
                yield start, "\n".join(lines)
            lines = []
            continue
        if not lines:
            start = number
        lines.append(line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, block in blocks(path.read_text()):
        for line in block.splitlines():
            m = HEADING.match(line)
            if m:
                base = slug(m.group(1))
                n = counts.get(base, 0)
                counts[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
    return found


def inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT.resolve())


def check_link(doc: Path, target: str) -> str | None:
    """Why the link ``target`` in ``doc`` is broken, or None."""
    if WEB.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    if path_part.startswith("/"):
        return "an absolute path; link relative to the file"
    dest = doc.parent / path_part if path_part else doc
    if not inside(dest):
        return "points outside the repository"
    if not dest.exists():
        return "no such file or folder in the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"no heading #{anchor} in {dest.resolve().relative_to(ROOT.resolve())}"
    return None


def check_code_word(doc: Path, word: str, tops: frozenset[str]) -> str | None:
    """Why the backticked ``word`` is a broken repository path or module, or None (also when it names neither)."""
    if not word or PLACEHOLDER.search(word) or WEB.match(word):
        return None
    if MODULE.match(word) and word.split(":")[0].rsplit(".", 1)[-1] not in FILE_SUFFIXES:
        base = ROOT.joinpath(*word.split(":")[0].split("."))
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return None
        return "no such module in the repository"
    path = word.split("::")[0]  # a pytest node id names its file
    if path.startswith(("./", "../")):
        dest = doc.parent / path
        if not inside(dest):
            return "points outside the repository"
        return None if dest.exists() else "no such file or folder in the repository"
    if path.split("/")[0] not in tops:
        return None
    return None if (ROOT / path).exists() else "no such file or folder in the repository"


def problems(doc: Path) -> list[str]:
    """One line per broken link or path in ``doc``: where it is, what it says, and what is wrong."""
    found: list[str] = []
    tops = top_level()
    rel = doc.relative_to(ROOT)
    for start, block in blocks(doc.read_text()):

        def line_of(offset: int, start: int = start, block: str = block) -> int:
            return start + block.count("\n", 0, offset)

        spans = list(CODE_SPAN.finditer(block))
        prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), block)  # same offsets, links in code dropped
        links = [(m.start(), m.group(1)) for m in INLINE_LINK.finditer(prose)]
        links += [(m.start(), m.group(1)) for m in REFERENCE_DEF.finditer(prose)]
        for offset, target in links:
            why = check_link(doc, target)
            if why:
                found.append(f"{rel}:{line_of(offset)}: link ({target}): {why}")
        for span in spans:
            for word in span.group(2).split():
                word = word.strip("'\"(),;")
                why = check_code_word(doc, word, tops)
                if why:
                    found.append(f"{rel}:{line_of(span.start())}: `{word}`: {why}")
    return found


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_resolve_inside_the_repository(doc):
    found = problems(doc)
    assert not found, "links or paths that do not resolve inside the repository:\n" + "\n".join(found)


def test_the_readme_links_the_architecture_page():
    links = {m.group(1) for m in INLINE_LINK.finditer((ROOT / "README.md").read_text())}
    assert "docs/architecture.md" in links
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_each_kind_of_bad_link_is_named(tmp_path, monkeypatch):
    """The checker itself, on a scratch repository: every bad link is reported by name, good ones are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "real.py").write_text("")
    (tmp_path / "README.md").write_text(
        "# Title\n\n## Good part\n\n"
        "[ok](server/real.py) [ok](#good-part) [ok](https://example.com/x) `server/real.py` `server.real`\n"
        "[bad](server/missing.py) [bad](../shared/DESIGN.md) [bad](/etc/passwd) [bad](#no-such-heading)\n"
        "`server/gone.py` `../shared/DESIGN.md` `server.nothing` `/var/cache/loraplex` `<out>/x`\n"
        "[a link whose text\nwraps](server/also-missing.py)\n\n"
        "```\n[not checked](inside/a/fence.md) `server/in-fence.py`\n```\n"
    )
    (tmp_path / "docs" / "page.md").write_text("[ok](../README.md#good-part) [bad](../README.md#nope)\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = problems(tmp_path / "README.md") + problems(tmp_path / "docs" / "page.md")
    text = "\n".join(found)
    bad = [
        "README.md:6: link (server/missing.py): no such file",
        "README.md:6: link (../shared/DESIGN.md): points outside",
        "README.md:6: link (/etc/passwd): an absolute path",
        "README.md:6: link (#no-such-heading): no heading",
        "README.md:7: `server/gone.py`: no such file",
        "README.md:7: `../shared/DESIGN.md`: points outside",
        "README.md:7: `server.nothing`: no such module",
        "README.md:8: link (server/also-missing.py): no such file",
        "docs/page.md:1: link (../README.md#nope): no heading #nope in README.md",
    ]
    for line in bad:
        assert line in text, (line, text)
    assert len(found) == len(bad), text
