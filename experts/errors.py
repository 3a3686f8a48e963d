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


class ExpertBuildingError(ExpertUnavailableError):
    """The expert has no row yet: a running job is building it (the demo repository, for one)."""

    def __init__(self, expert_id: str, job_id: str, what: str) -> None:
        super().__init__(f"expert {expert_id!r} is being built by job {job_id} ({what}); it answers once the "
                         f"job has registered it: watch GET /admin/jobs/{job_id}")
        self.expert_id, self.job_id = expert_id, job_id


class ExpertInUseError(ExpertError):
    """The expert cannot be removed because others depend on it."""


class GenerationInputError(ExpertError, ValueError):
    """Bad generation input, e.g. the prompt does not fit the context window."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EngineOverloadedError(ExpertError):
    """The model's waiting queue is full: try again later (`retry_after` seconds)."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


class UpstreamError(ExpertError):
    """A remote expert's upstream failed, timed out or refused.

    `status` is the HTTP status the gateway answers with: the upstream's own 4xx (relayed), 429 when
    rate limited, 502 for a bad response or 5xx, 503 when the upstream is unavailable (breaker open,
    connection refused), 504 on a timeout. `kind` classifies the failure for metrics. Messages name
    the expert and never contain its API key.
    """

    def __init__(self, expert_id: str, status: int, kind: str, message: str, *, code: str | None = None,
                 type: str | None = None, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"expert {expert_id!r}: {message}")
        self.expert_id = expert_id
        self.status = status
        self.kind = kind
        self.code = code or f"upstream_{kind}"
        self.type = type
        self.param = param
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth another attempt at the same upstream: connection failures, 429 and 5xx."""
        return self.kind in RETRYABLE_KINDS

    @property
    def fallback_ok(self) -> bool:
        """Worth trying another expert: anything but a 4xx that says the request itself is wrong."""
        return self.status >= 500 or self.status == 429


RETRYABLE_KINDS = frozenset({"connect", "connect_timeout", "pool", "connection", "status_5xx", "rate_limited"})


class RegistryMismatchError(ExpertError):
    """The registry database and the data dir are not a pair (another database URL, a recreated or
    restored registry): the gateway refuses to start rather than treat the artifacts as orphans."""


class OrphanNotFoundError(ExpertError, KeyError):
    """No quarantined artifact of that name in `<data dir>/orphans`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no orphaned artifact named {name!r}")
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class PipelineConflictError(ExpertExistsError):
    """An id a pipeline would register is taken by an expert that pipeline request did not make."""

    def __init__(self, expert_id: str, message: str) -> None:
        ExpertError.__init__(self, message)
        self.expert_id = expert_id
