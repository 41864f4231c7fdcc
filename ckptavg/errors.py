"""User-facing errors.

Every failure a user can cause (bad paths, inconsistent checkpoints, bad options) is a
`CkptavgError`: the CLI prints its message on one line and exits with its `exit_code` (2).
The operating system failing mid-run (a full disk, an I/O error, a permission or a file that
vanished) is one line too, with exit code 3 (`IOFailure`, or a plain `OSError` reaching the
CLI). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class CkptavgWarning(UserWarning):
    """Something the user should know that does not stop the command (a step left out of a trajectory,
    a legacy file loaded whole): the CLI shows it as one line."""


class CkptavgError(Exception):
    """Base class: an error caused by the input or the environment, not by ckptavg."""

    exit_code = 2


class OptionError(CkptavgError):
    """An option value that cannot be used; raised before any download, read or write."""


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


class ManifestError(CkptavgError):
    """A ckptavg.json that this version cannot read (another version's, or damaged)."""


class ScheduleError(CkptavgError):
    """Schedule parameters that describe no valid run."""


class MissingStepsError(ScheduleError):
    """A window needs checkpoints the trajectory does not have."""


class SavingsError(CkptavgError):
    """Results that cannot give a savings figure."""


class HubError(CkptavgError):
    """The Hub could not give what a trajectory needs. The subclasses keep huggingface_hub's
    distinctions, so that a library caller can tell a typo from an outage."""


class RepoNotFoundError(HubError):
    """No such repo, or a private one without a login."""


class RevisionNotFoundError(HubError):
    """The repo has no such branch, tag or commit."""


class HubAuthError(HubError):
    """The Hub refused the credentials (gated or private repo)."""


class HubUnreachableError(HubError):
    """No network, a refused connection, a timeout, or a server error (5xx)."""


class HubOfflineError(HubError):
    """HF_HUB_OFFLINE is set and what is needed is not in the cache."""


class IntegrityError(CkptavgError):
    """Downloaded bytes whose sha256 is not the one the Hub lists for them, twice in a row."""


class JobsFailedError(CkptavgError):
    """Some of a study's cluster jobs did not finish (an error, a cancellation, a lost node); what the others
    finished is kept, and running the study again does the rest."""

    exit_code = 4


class SubmitError(CkptavgError):
    """Slurm would not take a job (no controller reachable, a partition or account it refuses): sbatch's own
    line; nothing was queued."""


class RankError(CkptavgError):
    """Another rank of an average shared by several (torchrun, srun) failed or fell silent: this one stopped
    too, with nothing committed; the failing rank's own line says why."""


class IOFailure(CkptavgError):
    """The operating system failed a read or write mid-run: ENOSPC, EIO, EACCES, a vanished file."""

    exit_code = 3


def describe_os_error(e: OSError) -> str:
    """One line naming the path and the cause: `out/step3000: No space left on device (ENOSPC)`."""
    import errno as errno_names

    cause = e.strerror or (os.strerror(e.errno) if e.errno else type(e).__name__)
    code = errno_names.errorcode.get(e.errno or -1)
    where = e.filename if e.filename is not None else "(no path)"
    return f"{where}: {cause}" + (f" ({code})" if code else "")


def with_path(e: OSError, path: str | os.PathLike) -> OSError:
    """The same error, naming `path` (writes and reads on an open file descriptor name none)."""
    if e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))
