"""User-facing errors.

Every failure a user can cause (bad paths, inconsistent checkpoints, a full disk) is a
`CkptavgError`: the CLI prints its message on one line and exits with code 2. Anything
else is a bug and keeps its traceback.
"""


class CkptavgError(Exception):
    """Base class: an error caused by the input or the environment, not by ckptavg."""


class InputError(CkptavgError):
    """An input path is missing or holds no recognisable checkpoint."""


class CorruptCheckpointError(CkptavgError):
    """A weight file is truncated, malformed, or disagrees with its index."""


class UnsafeCheckpointError(CkptavgError):
    """A pickle that cannot be read without executing arbitrary code."""


class MismatchError(CkptavgError):
    """Checkpoints that cannot be averaged together (names, shapes, dtype families)."""


class WeightsError(CkptavgError):
    """Averaging weights that do not fit the inputs."""


class OutputExistsError(CkptavgError):
    """The output folder exists and --force was not given."""


class DiskSpaceError(CkptavgError):
    """Not enough free space for the output."""
