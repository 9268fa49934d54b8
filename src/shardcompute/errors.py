"""Errors a user, a file or the network can cause. Each names the thing at fault."""


class ShardComputeError(ValueError):
    """Base class: a problem with input, not a bug. The CLI prints it without a traceback."""


class ModelFormatError(ShardComputeError):
    """A checkpoint, GGUF file or config that cannot be read or is not a supported model."""


class PlanError(ShardComputeError):
    """A partition plan that cannot be made for this model and world size."""


class ShardFileError(ShardComputeError):
    """A pre-made shard that is missing, corrupt, or made for another cluster."""


class ConfigError(ShardComputeError):
    """A bad configuration value; the message names its key."""


class CollectiveError(ShardComputeError):
    """A peer was lost or a collective did not complete in time."""
