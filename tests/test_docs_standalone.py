"""Docs stand alone: no file of the repository cites a folder outside it (the project's private notes) or
their "spec section N"; every "docs/keye_vl2.md section N" citation names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist", "outputs", "runs"}
TEXT = {".py", ".md", ".cfg", ".toml", ".ipynb", ".yaml", ".yml", ".sh", ".jinja", ".txt"}
EXTERNAL = re.compile(
    r"shared/spec|\.\./shared/|/work/shared|\bspec sections? \d|spec ``(keye_vl2|dsa_kernels)|spec `(keye_vl2|dsa_kernels)|spec: \[open\]"
    r"|the spec's|\[open\] in the spec",
    re.IGNORECASE,
)
CITED = re.compile(r"docs/keye_vl2\.md``? sections? (\d+)(?:(?:-| and )(\d+))?")


def repo_text_files():
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in TEXT and path.name != Path(__file__).name:
            yield rel, path.read_text(encoding="utf-8", errors="replace")


def test_no_file_cites_material_outside_the_repository():
    hits = [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for rel, text in repo_text_files() for m in EXTERNAL.finditer(text)]
    assert hits == []


def test_every_cited_docs_section_exists():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", (REPO / "docs" / "keye_vl2.md").read_text(), re.M)}
    assert sections == set(range(1, 9))
    cited = set()
    for _, text in repo_text_files():
        for m in CITED.finditer(text):
            lo = int(m.group(1))
            cited |= set(range(lo, int(m.group(2) or lo) + 1))
    assert cited and cited <= sections
