"""The contract of a family exporter module: what ``Family.load_exporter()`` returns.

Each registered family names one module (``Family.exporter``) that provides these functions at module
level. ``export_model`` calls the common four; the captioner validator, the benchmark's eager runner
and ``kiln quantize``'s bitsandbytes path call the captioner ones on top. A module satisfies the protocol
structurally (``isinstance(module, FamilyExporter)`` checks that the names exist);
tests/exporters/test_protocol.py checks every registered module's signatures against it::

    exporter: FamilyExporter = family.load_exporter()
    model = exporter.load_model(source, trust_remote_code=False, **family_options)

The family's options, recipes and other facts live in its registry declaration, not in the module.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing them here would load torch for a type
    from .onnx_export import Component
    from .source import Source
    from .targets import Target


@runtime_checkable
class FamilyExporter(Protocol):
    """Functions every family exporter module provides."""

    def load_model(self, source: Source, trust_remote_code: bool = False, **options: Any) -> Any:
        """The PyTorch model (or pipeline of models) in fp32 eval mode. ``options`` are the family's
        declared ``export_options`` (each a keyword parameter with a default in the module)."""

    def build_components(self, model: Any, target: Target) -> Iterable[Component]:
        """The graphs to export for ``target``, each wrapping the loaded weights, in export order. The
        target decides the contrib ops a graph may use (fused attention, a buffered decoder cache)."""

    def runtime_config(self, model: Any) -> dict[str, Any]:
        """The manifest's ``runtime`` section: what the runtime pipeline needs beyond the graphs."""

    def save_runtime_files(self, source: Source, model: Any, directory: Path) -> None:
        """Copy the tokenizer, processor, scheduler and generation files the runtime reads."""


@runtime_checkable
class CaptionerExporter(FamilyExporter, Protocol):
    """What image-to-text family modules provide on top: the PyTorch side of validation."""

    def validation_cases(
        self, model: Any, pixel_values: Any, target: Target
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """(graph, case name, inputs) to run through both the graph and its PyTorch module, for the
        graphs exported for ``target``."""

    def torch_captions(
        self, model: Any, pixel_values: Any, prompt: str | None, **generation: Any
    ) -> list[list[int]]:
        """Generated token ids per image from transformers' own generate (the reference)."""

    def reference_processor(self, source: Source) -> Any:
        """The model's own image processor, to preprocess validation images on the PyTorch side."""


# Runtime task -> the protocol its family modules satisfy.
EXPORTER_PROTOCOLS: dict[str, type] = {
    "image-to-text": CaptionerExporter,
    "text-to-image": FamilyExporter,
}
