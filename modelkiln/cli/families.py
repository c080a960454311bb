"""kiln families [--json]: the model families kiln can export."""

from __future__ import annotations

import argparse

from modelkiln.cli.common import next_hint, print_json
from modelkiln.registry import FAMILIES

HELP = "list the supported model families"
LOADS_MODELS = False  # reads the registry table: works in the runtime-only install


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the families as JSON")


def run(args: argparse.Namespace) -> int:
    if args.json:
        print_json(
            [{"name": f.name, "task": f.task, "description": f.description} for f in FAMILIES.values()]
        )
    else:
        name_width = max(len(name) for name in FAMILIES)
        task_width = max(len(family.task) for family in FAMILIES.values())
        for family in FAMILIES.values():
            print(f"{family.name:{name_width}}  {family.task:{task_width}}  {family.description}")
    next_hint("kiln export --model SRC --out DIR")
    return 0
