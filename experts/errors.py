"""Domain exceptions of the expert repository. `app.errors` maps them to HTTP; nothing here knows HTTP."""

from __future__ import annotations


class ExpertError(Exception):
    """Base class for repository errors."""


class ExpertNotFoundError(ExpertError, KeyError):
    def __init__(self, expert_id: str) -> None:
        super().__init__(f"expert {expert_id!r} does not exist")
        self.expert_id = expert_id

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ExpertExistsError(ExpertError):
    def __init__(self, expert_id: str) -> None:
        super().__init__(f"expert {expert_id!r} already exists")
        self.expert_id = expert_id


class InvalidExpertError(ExpertError, ValueError):
    """An expert directory or upload failed validation; nothing was written."""


class ExpertUnavailableError(ExpertError):
    """The expert exists but cannot serve (not ready, failed to load, unsupported kind)."""


class ExpertInUseError(ExpertError):
    """The expert cannot be removed because others depend on it."""


class GenerationInputError(ExpertError, ValueError):
    """Bad generation input, e.g. the prompt does not fit the context window."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class JobNotFoundError(ExpertError, KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} does not exist")
        self.job_id = job_id

    def __str__(self) -> str:
        return str(self.args[0])


class JobCancelledError(ExpertError):
    """Raised inside a job's worker when the job was cancelled."""


class JobStateError(ExpertError):
    """The requested transition is not possible in the job's current state."""
