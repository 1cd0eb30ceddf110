"""The docs are in the project: no file cites a design page or notes from outside it, and every
file and name that docs/design.md points at exists."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
OUTSIDE = ("DESIGN" + ".md", "notes" + "/")  # split, so that this file does not name them itself


def _project_files():
    for folder in ("leffa", "data_prep", "benchmarks", "tests", "configs", "slurm", "replicate"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".sh", ".md"))
    yield ROOT / "Makefile"


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
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert missing == []
