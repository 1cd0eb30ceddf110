"""The docs are in the project: no file cites a design page or notes from outside it; every file and
name that docs/design.md points at exists; every dotted `leffa.` / `data_prep.` name and every
`configs/...` path that README.md and docs/*.md mention exists; and their links between each other
land on a page and a heading that exist."""

import importlib
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
OUTSIDE = ("DESIGN" + ".md", "notes" + "/")  # split, so that this file does not name them itself
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# a dotted name: not part of a path or of a longer name (`data/leffa.x`, `x.leffa.y`)
DOTTED_NAME = re.compile(r"(?<![\w/.-])((?:leffa|data_prep)(?:\.[A-Za-z_]\w*)+)")
# file names that read like dotted names (`leffa.json`, written by leffa export)
FILE_SUFFIXES = {"json", "yaml", "yml", "py", "md", "pth", "ckpt", "txt", "png", "jpg", "npy", "tar", "sh"}
CONFIG_PATH = re.compile(r"(?<![\w/.-])(configs/[\w./{},*-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _project_files():
    for folder in ("leffa", "data_prep", "benchmarks", "tests", "configs", "slurm", "replicate"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".sh", ".md"))
    yield ROOT / "Makefile"


def _exists(name: str) -> bool:
    """`leffa.a.b.c`: import the longest module prefix, then getattr the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(_expand_braces(head + o + tail) for o in match.group(1).split(",")))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", page.read_text(), flags=re.MULTILINE)}


def test_no_file_cites_a_page_outside_the_project():
    citing = [str(p.relative_to(ROOT)) for p in _project_files() if any(o in p.read_text() for o in OUTSIDE)]
    assert citing == []


def test_design_page_points_at_files_and_names_that_exist():
    text = DESIGN.read_text()
    paths = set(re.findall(r"\b((?:leffa|data_prep|benchmarks)/[\w/]+\.py)", text))
    assert len(paths) > 10
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []
    names = set(re.findall(r"`(leffa(?:\.\w+)+)", text))
    assert len(names) > 5
    assert sorted(n for n in names if not _exists(n)) == []


def test_the_pages_are_there_and_the_readme_is_a_front_door():
    names = {p.name for p in PAGES}
    assert {"data.md", "training.md", "finetuning.md", "released-models.md", "sampling-and-evaluation.md",
            "replication.md", "benchmarks.md", "design.md"} <= names
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for page in PAGES[1:]:  # the README links every page
        assert f"](docs/{page.name})" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_dotted_names_in_the_docs_exist(page):
    names = {n for n in DOTTED_NAME.findall(page.read_text()) if n.rsplit(".", 1)[-1] not in FILE_SUFFIXES}
    assert sorted(n for n in names if not _exists(n)) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_config_paths_in_the_docs_exist(page):
    missing = []
    for mention in set(CONFIG_PATH.findall(page.read_text())):
        mention = mention.rstrip(".,")
        for path in _expand_braces(mention):
            found = list(ROOT.glob(path.rstrip("/"))) if "*" in path else [ROOT / path]
            if not any(p.exists() for p in found):
                missing.append(path)
    assert sorted(missing) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_between_pages_land(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []
