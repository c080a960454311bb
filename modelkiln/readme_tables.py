"""The README's family and scheme tables, written from the registries they describe.

    python -m modelkiln.readme_tables          # rewrite the tables in README.md in place
    python -m modelkiln.readme_tables --check  # exit 1 when README.md is stale (what the test checks)

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` in the README;
everything outside the markers is left as written.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from modelkiln.quantize.schemes import SCHEMES
from modelkiln.registry import FAMILIES

README = Path(__file__).resolve().parent.parent / "README.md"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def families_table() -> str:
    rows = [[f"`{f.name}`", f.models, f.components] for f in FAMILIES.values()]
    return _table(["family", "models", "components"], rows)


def schemes_table() -> str:
    rows = [[f"`{s.name}`", s.kind, s.description, s.notes] for s in SCHEMES.values()]
    return _table(["scheme", "kind", "what it makes", "notes"], rows)


# Marker name -> the function that writes the table.
TABLES: dict[str, Callable[[], str]] = {"families": families_table, "schemes": schemes_table}


def render(text: str) -> str:
    """``text`` with every generated table replaced by its current version."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(\n<!-- end generated -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no '<!-- generated: {name} -->' block: add the markers back.")
        text = pattern.sub(lambda match, make=make: match.group(1) + make() + match.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    fresh = render(current)
    if args.check:
        stale = fresh != current
        print("README.md tables are stale: run python -m modelkiln.readme_tables" if stale else "up to date")
        return int(stale)
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
