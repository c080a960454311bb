"""The README's family and scheme tables are the registries': a stale table fails here."""

from __future__ import annotations

import pytest

from modelkiln import readme_tables
from modelkiln.quantize.schemes import SCHEMES
from modelkiln.registry import FAMILIES


def test_readme_tables_are_up_to_date(capsys):
    assert readme_tables.main(["--check"]) == 0, "run: python -m modelkiln.readme_tables"


def test_every_family_and_scheme_has_a_row():
    families, schemes = readme_tables.families_table(), readme_tables.schemes_table()
    assert all(f"| `{name}` |" in families for name in FAMILIES)
    assert all(f"| `{name}` |" in schemes for name in SCHEMES)


def test_an_edited_table_is_rewritten_and_missing_markers_are_named():
    text = readme_tables.README.read_text()
    stale = text.replace(f"| `{next(iter(FAMILIES))}` |", "| `renamed` |")
    assert stale != text and readme_tables.render(stale) == text
    with pytest.raises(SystemExit, match="no '<!-- generated: families -->' block"):
        readme_tables.render(text.replace("<!-- generated: families -->", ""))
