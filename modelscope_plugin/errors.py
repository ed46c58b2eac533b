"""Every error a user can cause, in one place; this module imports nothing of the package.

Each bad input raises exactly one of these, with a message naming the input and the reason:

=========================  ===================================================================================
``ImageInputError``        an image: missing, empty, truncated or corrupt file, unreachable URL, too many pixels
                           for PIL, unsupported type, dtype, shape or values (NaN, inf, out of range)
``CheckpointError``        a weights file: missing, empty, truncated, carrying code (refused), or not matching
                           the network (missing / unexpected / mis-shaped keys, all listed at once)
``ModelDirError``          a model directory: missing, no or invalid configuration.json, unknown model type,
                           no or several weights files, class names not matching the classes
``ModelNotAvailableError`` a supported hub id that is neither cached nor downloadable
``DatasetProblemsError``   dataset rows that a reader rejected (with ``on_error="raise"``)
``DatasetLayoutError``     a dataset folder in no known layout, or with a part missing or ambiguous
``TrainingDataError``      a training row that cannot be turned into targets
``TrainingConfigError``    a trainer configuration or dataset the trainer cannot use
``CardError``              a model card that cannot be validated, assembled or published
``ExportError``            a network that cannot be exported, or whose exported graph disagrees with it
``CommandError``           a command-line invocation that cannot run (exit code 1)
``TaskError``              a task name that is not panoptic, semantic or instance
=========================  ===================================================================================

``USER_ERRORS`` catches the first four, which every entry point (pipeline, command line, browser demo) reports as
one line; the command line maps them to exit code 1. Each can be built from its message alone, as ModelScope's
``build_from_cfg`` re-raises an error from a registered class's constructor (``type(error)(f"{class}: {error}")``).
"""


class ImageInputError(ValueError):
    """An input image cannot be read or has an unsupported type/value."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, is refused, or does not fit the model."""


class KeymapError(CheckpointError):
    """A Hugging Face state dict that does not convert completely and unambiguously."""


class ModelDirError(ValueError):
    """A model directory is missing files or holds a layout this package cannot run."""


class FastInstConfigError(ModelDirError):
    """A FastInst configuration asks for something this package does not implement (or is malformed)."""


class ModelNotAvailableError(RuntimeError):
    """A supported hub id that is neither in the local cache nor downloadable."""


class DatasetProblemsError(ValueError):
    """Raised with ``on_error="raise"``; ``problems`` lists every rejected row (``image_id``, ``reason``). Built
    from a message alone (ModelScope's re-raise), it keeps the message and lists no rows."""

    def __init__(self, problems):
        if isinstance(problems, str):
            self.problems = []
            super().__init__(problems)
            return
        self.problems = problems
        listed = "; ".join(f"{problem.image_id}: {problem.reason}" for problem in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} dataset rows rejected: {listed}{more}")


class DatasetLayoutError(ValueError):
    """A dataset folder matches no known layout, or a part of its layout is missing or ambiguous."""


class TrainingDataError(ValueError):
    """Training rows cannot be turned into targets (unknown category, unreadable files, a task the annotations do
    not support)."""


class TrainingConfigError(ValueError):
    """The trainer configuration or the datasets given to it cannot be used."""


class CardError(ValueError):
    """A card cannot be validated, assembled or published; the message names the card and the reason."""


class ExportError(RuntimeError):
    """The network could not be exported, or the exported graph disagrees with the network."""


class CommandError(Exception):
    """A command-line invocation that cannot run; reported in one line, exit code 1 (2 is argparse's usage error)."""


USER_ERRORS = (ImageInputError, CheckpointError, ModelDirError, ModelNotAvailableError)


class TaskError(ValueError):
    """A segmentation task a model cannot answer (not one of panoptic, semantic, instance)."""
