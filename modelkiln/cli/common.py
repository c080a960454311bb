"""What every kiln command shares: the console, the `next:` hint, JSON output, spinners, the flags of
the commands that run an artifact, and the one-line message for a missing optional install.

Imports the standard library, rich and modelkiln's base only: every command module imports this while
`kiln --help` builds the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape

from modelkiln.backends import BACKENDS

console = Console(stderr=True, highlight=False, soft_wrap=True)

# Top-level module -> the extra that installs it: the one line a command that needs it prints when the
# runtime-only install (`pip install modelkiln`) lacks it.
EXTRA_OF: dict[str, str] = {
    **dict.fromkeys(
        (
            "torch",
            "transformers",
            "diffusers",
            "onnx",
            "onnxscript",
            "safetensors",
            "peft",
            "sacrebleu",
            "skimage",
        ),
        "export",
    ),
    **dict.fromkeys(("bitsandbytes", "accelerate"), "bnb"),
    "matplotlib": "bench",
    **dict.fromkeys(("ray", "pyarrow"), "ray"),  # kiln caption --engine ray; Parquet in and out
}


@contextlib.contextmanager
def status(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr for a long step; yields a function that updates its text."""
    with console.status(message) as spinner:
        yield lambda text: spinner.update(f"{message}: {text}")


# What transformers, diffusers and huggingface_hub read when they are imported: verbosity and bars.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
QUIET_LIBRARIES = ("transformers.utils.logging", "diffusers.utils.logging")  # settable once imported


@contextlib.contextmanager
def _quiet_model_loading() -> Iterator[None]:
    """Hide transformers' and diffusers' per-load progress bars and info chatter while a command loads
    PyTorch models (a demo, a benchmark and a validation load several), restoring everything after.

    It imports neither library: one not imported yet reads the environment set here when the command
    imports it; one already imported (the Python API, tests) is set through its logging module. So a
    usage error still comes before torch loads, and the runtime-only install can run it."""
    saved_environment = {key: os.environ.get(key) for key in QUIET_ENVIRONMENT}
    os.environ.update(QUIET_ENVIRONMENT)
    loaded = [sys.modules[name] for name in QUIET_LIBRARIES if name in sys.modules]
    saved = [(library, library.is_progress_bar_enabled(), library.get_verbosity()) for library in loaded]
    for library in loaded:
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, bar, level in saved:
            (library.enable_progress_bar if bar else library.disable_progress_bar)()
            library.set_verbosity(level)
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def next_hint(command: str) -> None:
    console.print(f"next: [bold]{escape(command)}[/bold]")


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def source_of(artifact: str) -> str:
    """The model an artifact was exported from, as its manifest records it, for `next:` hints."""
    from modelkiln.manifest import read_manifest  # here, not at the top: `kiln --help` needs none of it

    return read_manifest(artifact).source.model


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="cpu", choices=list(BACKENDS), help="execution backend")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
