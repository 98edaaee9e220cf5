"""dtrain's exceptions. Every error says what broke, the values involved, and the fix.

    DtrainError
    ├── CommError           a collective or connection failed (dead peer, mismatched calls, abort)
    │   └── CommTimeout     no progress within the timeout (also a TimeoutError)
    ├── RendezvousError     ranks could not find or authenticate each other
    ├── DataError           bad input data (corrupt record, wrong feature type)
    └── ConfigError         bad arguments or settings (also a ValueError)
"""


class DtrainError(RuntimeError):
    """Base class of every error dtrain raises."""


class CommError(DtrainError):
    """A collective or a connection failed: a peer died, aborted, or called something else."""


class CommTimeout(CommError, TimeoutError):
    """A collective made no progress within the timeout; the message names the missing ranks."""


class RendezvousError(DtrainError):
    """Ranks could not find each other or could not prove the job token."""


class DataError(DtrainError):
    """Input data is malformed; the message names the file, byte offset and feature."""


class ConfigError(DtrainError, ValueError):
    """An argument or setting is invalid; the message says which and what to use instead."""
