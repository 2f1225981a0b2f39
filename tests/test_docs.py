"""The README stays short and its Quickstart is what CI runs; every relative link of the README and of the
documentation pages (docs/) points to a file that exists, and to a heading that exists; every table the results
pages generate or include can be built from benchmarks/results/. `mkdocs build --strict` (CI) checks the site as a
whole; these checks are fast and also cover the README, which the site does not build."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 200
DATA_PREFIX = "results/data/"  # docs/gen_results.py publishes benchmarks/results/ there

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`]*`")
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(path: Path, text: str | None = None) -> list[str]:
    """The lines of a Markdown file (or of ``text``) outside fenced code blocks, with inline code removed."""
    out, fenced = [], False
    for line in (path.read_text(encoding="utf-8") if text is None else text).splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        out.append("" if fenced else INLINE_CODE.sub("", line))
    return out


def links(text: str) -> list[str]:
    return LINK.findall(text) + REF_LINK.findall(text)


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (MkDocs) and GitHub give a heading."""
    text = re.sub(r"[*_`]", "", heading.strip())
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for line in prose_lines(path) if (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line))}


def resolve(page: Path, target: str) -> Path:
    """The file a relative link of ``page`` points to (docs' results/data/ is benchmarks/results/)."""
    path = (page.parent / target).resolve()
    try:
        rel = path.relative_to(DOCS).as_posix()
    except ValueError:
        return path
    return RESULTS / rel[len(DATA_PREFIX):] if rel.startswith(DATA_PREFIX) else path


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """Every relative link of ``page`` (its text, or ``text`` as if it were there) whose file, or whose heading in a
    Markdown file, does not exist."""
    bad = []
    for target in links("\n".join(prose_lines(page, text))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
            continue
        file, _, anchor = target.partition("#")
        path = resolve(page, file) if file else page
        if not path.exists():
            bad.append(f"{target} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target} (no heading #{anchor} in {path.name})")
    return bad


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {README_MAX_LINES})"


def quickstart_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Quickstart' section"
    blocks = re.findall(r"^```(?:bash|sh)?\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert "kunlun train" in commands[0] and "pytest" in commands[1], commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[1] in [ln.strip() for ln in ci], ".ci/run must run the README's test command verbatim"


def test_every_relative_link_points_to_an_existing_file():
    bad = {p.relative_to(ROOT).as_posix(): b for p in pages() if (b := broken_links(p))}
    assert not bad, bad


def test_a_broken_link_is_caught():
    """The check is not vacuous: a link to a missing file and one to a missing heading are reported; links in code
    are not links."""
    page = DOCS / "index.md"
    text = page.read_text(encoding="utf-8") + "\n[gone](no-such-page.md) [moved](user-guide.md#no-such-heading) `[code](x.md)`\n"
    bad = broken_links(page, text)
    assert [b.split(" ")[0] for b in bad] == ["no-such-page.md", "user-guide.md#no-such-heading"], bad


def gen_results():
    spec = importlib.util.spec_from_file_location("gen_results", DOCS / "gen_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_tables_build_from_benchmarks_results():
    """Every generated table marker names a table that builds from the files, and every included file exists."""
    gen = gen_results()
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        gen.render(text, page.name)  # raises on an unknown table or a missing file
        for line in text.splitlines():
            if m := SNIPPET.match(line):
                assert (RESULTS / m.group(1)).is_file(), f"{page.name}: --8<-- {m.group(1)!r} is not in benchmarks/results/"


def test_an_unknown_results_table_fails():
    gen = gen_results()
    with pytest.raises(gen.ResultsError, match="unknown results table"):
        gen.render("<!-- results-table: no-such-table -->", "page.md")


def test_embedding_rate_table_bolds_each_models_best_validation_run(tmp_path, monkeypatch):
    """The rate a model is chosen at is its lowest validation NE in the scan, even where another rate's test NE is lower."""
    gen = gen_results()
    (tmp_path / "onepass3m").mkdir()
    rows = [("kunlun", 0.001, 0.80, 0.79), ("kunlun", 0.01, 0.78, 0.81), ("interformer", 0.001, 0.83, 0.82),
            ("interformer", 0.03, 0.84, 0.80)]  # (family, rate, valid NE, test NE): valid and test disagree
    lines = ["family,ne,valid_ne,code,point"] + [f"{f},{t},{v},c,sw/points/embedding_lr{lr}" for f, lr, v, t in rows]
    (tmp_path / "onepass3m" / "elr-runs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    table = gen.TABLES["onepass3m-embedding-rate"]()
    kunlun, interformer = (next(line for line in table.splitlines() if line.startswith(f"| {f} |")) for f in ("kunlun", "interformer"))
    assert "**0.7800 / 0.8100**" in kunlun and kunlun.count("**") == 2
    assert "**0.8300 / 0.8200**" in interformer and interformer.count("**") == 2
