"""Errors a user can cause. The command line turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """A problem with the user's input, configuration or files; the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting out of range or inconsistent with another."""


class BackboneError(UserError, RuntimeError):
    """A model that cannot be loaded or whose architecture is not supported; the message says how to fix it.

    Both ``vtrans.backbone.architectures`` (an unknown architecture) and ``vtrans.backbone.loading`` (a missing model)
    raise it, so it lives here rather than in either.
    """


class CheckpointError(UserError):
    """A file that is missing, truncated, unsafe, or not a vtrans checkpoint.

    ``vtrans.latent.checkpoint`` (reading) and ``vtrans.latent.checkpoint_io`` (training's writer and resume)
    both raise it, so it lives here rather than in either.
    """


class TrainingStopped(RuntimeError):
    """Training stopped at a non-finite loss, weight or gradient; the message names the step.

    Not a user error: the command line ends with one line on stderr and exit code 1.
    """
