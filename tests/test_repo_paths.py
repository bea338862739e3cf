"""The repository names only what it has: every repository path a docstring, comment, message or
document (README.md, BENCHMARKS.md, ...) names exists (the sibling of test_errors.py's check that
every --flag a message names exists), and each stage is registered once, by its link
kvdistill/<stage> -> ../<stage>: the wheel's package discovery follows the links, the layers
contract names every stage, and the tests are no package of the wheel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.name for p in (ROOT / "kvdistill").iterdir() if p.is_symlink())  # align, dump, ...
SCANNED = ["kvdistill", *STAGES, "bench", "tests"]  # every *.py below these (rglob does not follow the links)
# A path is a known top-level folder, then a file with one of these extensions or a folder ending
# in "/": bare `word/word` is too often something else (a ratio such as "align/forward", a metric
# key, "store/student" as "store or student") to be read as a path.
PREFIXES = [*SCANNED, "core", "docs", "examples", r"\.ci"]  # core/x.py: kvdistill/core/x.py, as the code says it
EXTENSIONS = ["py", "md", "yaml", "yml", "toml", "json", "jsonl", "conf", "png", "svg", "html", "sh", "txt", "cfg"]
PATH = re.compile(
    rf"(?<![\w./-])((?:{'|'.join(PREFIXES)})/(?:[\w.<>{{}}*-]+/)*(?:[\w<>{{}}*-]+\.(?:{'|'.join(EXTENSIONS)})\b|(?=[\s`'\"),;:]|$)))"
)
DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_]*\.md)\b")  # README.md, DESIGN.md: top-level documents
PLACEHOLDER = re.compile(r"<[^<>/]*>|\{[^{}/]*\}")  # kvdistill/<stage>, train/recipes/{recipe}.yaml


def repo_paths(text: str) -> set[str]:
    """The repository paths `text` names (folders keep their trailing "/")."""
    return {m.group(1) for m in PATH.finditer(text)} | {m.group(1) for m in DOC.finditer(text)}


def missing(path: str) -> bool:
    """A placeholder (`<name>`, `{name}`) stands for any one name: the path must match something."""
    path = f"kvdistill/{path}" if path.startswith("core/") else path
    pattern = PLACEHOLDER.sub("*", path.rstrip("/"))
    if pattern != path.rstrip("/") or "*" in pattern:
        return not any(ROOT.glob(pattern))
    return not (ROOT / path).exists()


def _scanned_files() -> list[Path]:
    """This file aside: its own test names paths that must not exist."""
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py")) if p != Path(__file__).resolve()]
    return files + sorted(ROOT.glob("*.md")) + [ROOT / "pyproject.toml", ROOT / "Makefile"]


def test_the_scan_finds_paths_placeholders_and_documents_and_skips_what_is_not_a_path():
    text = (
        "see store/rows.py, `train/recipes/` and dump/nothere.py; kvdistill/<stage> -> ../<stage>; "
        "train/recipes/{recipe}.yaml; numbers in BENCHMARKS.md and DESIGN.md; align/forward s; "
        "store/student; OUT.zarr/teachers/a; ~/kvdistill/dump/run.py; (core/capture.py)"
    )
    found = repo_paths(text)
    assert found == {
        "store/rows.py",
        "train/recipes/",
        "dump/nothere.py",
        "train/recipes/{recipe}.yaml",
        "BENCHMARKS.md",
        "DESIGN.md",
        "core/capture.py",
    }
    assert sorted(p for p in found if missing(p)) == ["DESIGN.md", "dump/nothere.py"]
    assert missing("kvdistill/<stage>.yaml") and not missing("kvdistill/<name>/__init__.py")


def test_every_repository_path_named_in_the_code_or_the_documents_exists():
    named: dict[str, set[str]] = {}
    for path in _scanned_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in repo_paths(line):
                named.setdefault(name, set()).add(f"{path.relative_to(ROOT)}:{number}")
    stale = {name: sorted(where) for name, where in sorted(named.items()) if missing(name)}
    assert not stale, f"paths named in the code / documents that the repository does not have: {stale}"
    assert {"store/rows.py", "jobs/accelerate/fsdp.yaml", "BENCHMARKS.md"} <= set(named)  # the scan does find paths


def test_each_stage_is_registered_once_by_its_link_and_is_a_layer_and_the_tests_are_not_shipped():
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for stage in STAGES:
        link = ROOT / "kvdistill" / stage
        assert link.readlink() == Path("..") / stage and (link / "__init__.py").is_file(), stage
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = set(setuptools.find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    top = {p.split(".")[1] for p in packages if p.count(".") >= 1}
    assert top == {*STAGES, "core"}, top  # what the wheel holds: kvdistill, core and every linked stage
    assert not any("tests" in p.split(".") for p in packages)
    # Every module and subpackage of kvdistill sits in one layer of the contract (else it is unchecked).
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    layered = {m.strip().removeprefix("kvdistill.") for layer in layers for m in layer.split("|")}
    modules = {p.stem for p in (ROOT / "kvdistill").glob("*.py")} - {"__init__", "__main__"}
    assert layered == modules | top, layered ^ (modules | top)
