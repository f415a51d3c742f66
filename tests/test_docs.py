"""The API reference (``docs/``): it builds with Sphinx without a warning, documents every public name, runs its
code as written, and its table of certified numbers says what the README's says."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

import lipreg

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.rst"))
CODE = [(page, block) for page in PAGES
        for block in re.findall(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", page.read_text(), flags=re.M)]


def build_html(out: Path) -> None:
    """The HTML build, as CI runs it: every warning is an error (``-W``), all of them reported (``--keep-going``)."""
    build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                            str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert build.returncode == 0, f"sphinx-build failed:\n{build.stdout}\n{build.stderr}"


def documented(html: Path) -> set[str]:
    """The names of the objects the build documents, from its inventory (``objects.inv``: four header lines,
    then zlib-compressed lines ``name domain:role priority uri display-name``)."""
    data = (html / "objects.inv").read_bytes()
    body = data.split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def test_the_docs_have_python_blocks() -> None:
    assert len(CODE) >= 2


@pytest.mark.parametrize("page, code", CODE, ids=[f"{page.stem}{i}" for i, (page, _) in enumerate(CODE)])
def test_docs_block_runs(page: Path, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(textwrap.dedent(code), str(page), "exec"), {"__name__": "docs"})


def readme_certified_table() -> list[list[str]]:
    section = (ROOT / "README.md").read_text().split("## Which numbers are certified\n", 1)[1]
    rows = re.match(r"\s*((?:\|.*\|\n)+)", section).group(1).splitlines()
    rows = [row[1:-1] for row in rows]
    cells = [re.split(r"(?<!\\)\|", row) for row in rows if not re.fullmatch(r"[-| ]+", row)]
    return [[cell.strip().replace("\\|", "|") for cell in row] for row in cells]


def docs_certified_table() -> list[list[str]]:
    table = (DOCS / "certified.rst").read_text().split(".. list-table::", 1)[1].split("\n\n", 2)[1]
    return [[cell.strip() for cell in re.split(r"\n\s*- ", "\n" + row.strip())[1:]]
            for row in re.split(r"^   \* ", table, flags=re.M)[1:]]


def test_the_certified_table_matches_the_readme() -> None:
    readme = readme_certified_table()
    assert len(readme) >= 8 and all(len(row) == 3 for row in readme)
    assert docs_certified_table() == readme, "docs/certified.rst and the README's table differ: update docs/"


@pytest.mark.slow
def test_the_docs_build_without_warnings_and_document_every_public_name(tmp_path: Path) -> None:
    build_html(tmp_path)  # one test, so that pytest-xdist never builds twice
    missing = {f"lipreg.{name}" for name in lipreg.__all__} - documented(tmp_path)
    assert not missing, f"add these to the API pages in docs/api/: {sorted(missing)}"
