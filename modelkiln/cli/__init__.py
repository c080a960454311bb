"""The kiln command line: export, quantize, run, validate, benchmark and inspect artifacts.

    kiln demo                                   # export the shipped captioner, caption, validate
    kiln export --model SRC --out DIR [--target onnxruntime|portable|tensorrt] [--family F] [--opset N] ...
    kiln caption DIR IMAGE... [--num-beams N] [--max-new-tokens N] [--json]
    kiln generate DIR "a prompt" [--steps N] [--seed S] [--height H] [--width W] --out image.png
    kiln validate DIR --model SRC [--json]
    kiln engine DIR --out DIR [--precision fp32|fp16|bf16|int8] [--profile C:INPUT=MIN,OPT,MAX]... [--refit E]
    kiln inspect DIR [--json]
    kiln verify DIR [--json]
    kiln bench --preset tiny|full | --model SRC [--variant DIR]... [--schemes S,S] [--peers optimum] --out DIR
    kiln build RECIPE.toml [--out DIR]          # export, validate, quantize, bench; exit 1 on a failed gate

Bad input ends with one ``error:`` line naming the fix and exit code 2; a failed check exits 1. Each
command's last line suggests the natural next command.

Each command is one module of this package (its help, its arguments, its run function), listed in
``COMMANDS``. Start-up stays light: building the parser imports only the standard library, rich and
modelkiln's base tables; each command imports what it needs when it runs, so `kiln --help` is quick and
`caption`, `inspect`, `verify` and `families` work in the runtime-only install (no torch, no onnx).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib

from rich.markup import escape

from modelkiln import __version__
from modelkiln.cli.common import EXTRA_OF, _quiet_model_loading, console
from modelkiln.errors import KilnError

# Command name -> the module that declares it (HELP, LOADS_MODELS, add_arguments, run), in --help order.
COMMANDS: dict[str, str] = {
    "export": "modelkiln.cli.export",
    "caption": "modelkiln.cli.caption",
    "generate": "modelkiln.cli.generate",
    "validate": "modelkiln.cli.validate",
    "quantize": "modelkiln.cli.quantize",
    "engine": "modelkiln.cli.engine",
    "inspect": "modelkiln.cli.inspect",
    "verify": "modelkiln.cli.verify",
    "families": "modelkiln.cli.families",
    "bench": "modelkiln.cli.bench",
    "build": "modelkiln.cli.build",
    "demo": "modelkiln.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"modelkiln {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        command = commands.add_parser(name, help=module.HELP)
        module.add_arguments(command)
        # Commands that load PyTorch models run with the libraries' progress bars and chatter hidden.
        command.set_defaults(run=module.run, loads_models=module.LOADS_MODELS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command line, for reports
    try:
        with _quiet_model_loading() if args.loads_models else contextlib.nullcontext():
            return args.run(args)
    except KilnError as exc:
        # Escaped: messages quote user text and TOML sections like [export], which rich reads as markup.
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        console.print(
            f"[red]error:[/red] kiln {args.command} needs the {extra} tools ({exc.name} is not installed). "
            f"Install them with: pip install {escape(repr(f'modelkiln[{extra}]'))}"
        )
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; no partial artifact was left behind")
        return 130
