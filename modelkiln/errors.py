"""Errors modelkiln raises on bad input.

Every error says what went wrong and what to do next. The CLI prints the message of a ``KilnError``
without a traceback and exits with code 2 (bad input) or 1 (a check failed), so user mistakes never look
like crashes.
"""


class KilnError(Exception):
    """Base class: a problem the user can fix, with the fix in the message."""

    exit_code = 2


class UnsupportedModelError(KilnError):
    """The model's family is not one modelkiln can export."""


class SourceModelError(KilnError):
    """The ``--model`` source is missing, unsafe to load (pickle) or unreadable."""


class ArtifactError(KilnError):
    """A directory is not a modelkiln artifact, or its files do not match its manifest."""


class OutputExistsError(KilnError):
    """The output directory exists and ``--overwrite`` was not given."""


class ImageInputError(KilnError):
    """An image cannot be read: missing, corrupt, truncated, or of an unsupported array layout."""


class GenerationConfigError(KilnError):
    """Generation settings are invalid or ask for a feature the runtime does not implement."""


class ValidationFailedError(KilnError):
    """An artifact's outputs differ from PyTorch beyond tolerance."""

    exit_code = 1


class NonFiniteOutputError(KilnError):
    """A graph produced NaN or Inf: returning its image would hand the user a black or noise image."""
