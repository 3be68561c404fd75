"""The README is a front door and docs/ holds the reference: every name and link they give exists."""

import importlib
import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md")), PROJECT / "serving" / "README.md",
         PROJECT / "benchmarks" / "README.md", PROJECT / "export" / "README.md", PROJECT / "notebooks" / "README.md"]
# A dotted name starting with kiqa: `kiqa.scoring.scorer.load_scorer`, kiqa.serving.export, ...
NAME = re.compile(r"(?<![\w./-])kiqa(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _resolve(dotted):
    """Imports the longest module prefix of `dotted` and walks the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_kiqa_name_the_docs_mention_exists():
    missing = []
    for page in PAGES:
        for name in sorted(set(NAME.findall(page.read_text()))):
            name = name.rstrip(".")
            if name.startswith("kiqa.json") or name in ("kiqa.beam",) and importlib.util.find_spec("apache_beam") is None:
                continue  # a file name, not a module; Beam's module needs the [beam] extra
            try:
                _resolve(name)
            except (ImportError, AttributeError) as err:
                if "apache_beam" in str(err):
                    continue
                missing.append(f"{page.relative_to(PROJECT)}: {name} ({err})")
    assert missing == []


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(PROJECT)} -> {target}")
    assert broken == []


def test_readme_is_a_front_door():
    text = (PROJECT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    # The two commands come first, the venv activated so printed commands run as printed.
    first_block = text[text.index("```sh\n") + 6: text.index("```", text.index("```sh\n") + 6)]
    assert first_block.splitlines()[0].startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert "pytest" in first_block.splitlines()[1]
    for page in ("training", "evaluation", "serving", "beam", "multihost", "trust", "performance", "data"):
        assert f"docs/{page}.md" in text


@pytest.mark.parametrize("dotted", ["kiqa.nonexistent_module", "kiqa.scoring.scorer.NoSuchName"])
def test_the_name_check_can_fail(dotted):
    with pytest.raises((ImportError, AttributeError)):
        _resolve(dotted)
