"""Every error that agent_finetune and server_plugin raise on purpose.

Every class also subclasses the built-in that callers already catch::

    AgentFinetuneError
    ├── ConfigError(AgentFinetuneError, ValueError)        bad YAML / field value
    ├── DataError(AgentFinetuneError, ValueError)          bad dataset file / row
    ├── PromptTemplateError(AgentFinetuneError, ValueError) unknown placeholder
    ├── BackendError(AgentFinetuneError, RuntimeError)     backend unavailable
    ├── ModelSourceError(AgentFinetuneError, OSError)      base model not local, hub unreachable
    ├── UnservableAdapterError(AgentFinetuneError, ValueError)  vLLM could not serve it
    ├── RegistryError(AgentFinetuneError, RuntimeError)    registry operation failed
    │   ├── InvalidNameError(RegistryError, ValueError)
    │   ├── NotFoundError(RegistryError, KeyError)
    │   ├── RegistryReadError(RegistryError)               I/O error reading: the bytes may be fine
    │   ├── CurrentMovedError(RegistryError)                compare-and-swap of current lost
    │   ├── InvalidCanaryError(RegistryError, ValueError)   weight, guard or duration out of range
    │   ├── CaptureError(RegistryError, ValueError)         bad capture settings or size/age
    │   └── ValidationError(RegistryError, ValueError)     adapter failed validation
    │       └── AdapterFormatError(ValidationError)         malformed safetensors header
    ├── LoadError(AgentFinetuneError, RuntimeError)        the vLLM server refused a load/swap
    │   └── ServerUnavailableError(LoadError, ConnectionError)  5xx/timeout/down: retried
    ├── ServerResponseError(AgentFinetuneError, RuntimeError)  a server answered, not as asked
    ├── VllmCompatError(AgentFinetuneError, RuntimeError)  this vLLM lacks what the plugin uses
    ├── ServerStartError(AgentFinetuneError, RuntimeError) vLLM exited or hung before it was ready
    ├── CacheInUseError(AgentFinetuneError, OSError)    another process owns the cache folder
    ├── AskError(AgentFinetuneError, RuntimeError)         `ask`: the server lacks that name
    ├── EvalError(AgentFinetuneError, RuntimeError)        evaluation could not run
    ├── FeedbackError(AgentFinetuneError, ValueError)      a feedback post is malformed (400)
    │   └── UnknownResponseError(FeedbackError, LookupError)  no such answer recorded (404)
    ├── GateRefusedError(AgentFinetuneError, RuntimeError) the gate kept the live version (exit 3)
    └── DemoError(AgentFinetuneError, RuntimeError)        a demo step did not do what it should

Only the CLI turns these into exit codes and friendly text (``agent_finetune.cli.main``).
"""

from __future__ import annotations


class AgentFinetuneError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AgentFinetuneError, ValueError):
    """A configuration file or field is invalid."""


class DataError(AgentFinetuneError, ValueError):
    """A dataset file or one of its rows is invalid."""


class PromptTemplateError(AgentFinetuneError, ValueError):
    """A prompt template names a field that no row or template variable provides."""


class BackendError(AgentFinetuneError, RuntimeError):
    """The requested training backend cannot run here."""


class ModelSourceError(AgentFinetuneError, OSError):
    """The base model is not a local folder, not cached, and the hub cannot be reached."""


class UnservableAdapterError(AgentFinetuneError, ValueError):
    """The configuration would produce an adapter that vLLM cannot serve."""


class RegistryError(AgentFinetuneError, RuntimeError):
    """A registry operation failed."""


class InvalidNameError(RegistryError, ValueError):
    """An adapter name or version string breaks the naming rules."""


class NotFoundError(RegistryError, KeyError):
    """The adapter name or version does not exist in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RegistryReadError(RegistryError):
    """A registry file could not be read (EIO, ESTALE, EACCES...): a fact about the read,
    not about the bytes, so nothing is repaired or quarantined on it."""


class CurrentMovedError(RegistryError):
    """``current`` is no longer the version a decision started from (an operator moved it,
    or another decision won): nothing was changed."""


class InvalidCanaryError(RegistryError, ValueError):
    """A canary's weight, guards or duration are out of range, or its file is malformed."""


class CaptureError(RegistryError, ValueError):
    """Capture settings are malformed or out of range (sample, size, age, redact hook)."""


class ValidationError(RegistryError, ValueError):
    """An adapter version failed validation; ``problems`` lists every cause."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class AdapterFormatError(ValidationError):
    """An adapter file is malformed (e.g. a safetensors header the safetensors library refuses).

    The header parser raises this, and only this, for any input bytes.
    """


class LoadError(AgentFinetuneError, RuntimeError):
    """The vLLM server refused to load, repoint or unload an adapter."""


class ServerUnavailableError(LoadError, ConnectionError):
    """The server could not answer (5xx, timeout, connection refused, engine restarting): a
    load, repoint or unload of the plugin or sidecar (a transient failure, retried with
    backoff), or a request of the CLI's ``ServerClient`` (the message names the URL and says
    how to start or point at a server). Being an ``OSError``, it is caught wherever I/O errors
    are."""


class ServerResponseError(AgentFinetuneError, RuntimeError):
    """A server answered a ``ServerClient`` request, but not as asked: an HTTP 4xx (a refused
    API key, an unknown route or model), or a body that is not the JSON the route promises
    (no agent_finetune plugin on that server). ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VllmCompatError(AgentFinetuneError, RuntimeError):
    """The installed vLLM lacks an internal the plugin uses, or runs in a mode it cannot
    serve (``server_plugin.compat``)."""


class ServerStartError(AgentFinetuneError, RuntimeError):
    """A vLLM server started here exited, or did not answer, before it was ready; the
    message carries the tail of its log."""


class CacheInUseError(AgentFinetuneError, OSError):
    """The server-side cache folder asked for is locked by another running process (a
    second sidecar for the same server)."""


class AskError(AgentFinetuneError, RuntimeError):
    """The server does not serve the requested adapter (the message lists what it serves)."""


class EvalError(AgentFinetuneError, RuntimeError):
    """An evaluation could not run: server down, bad rows, a version missing."""


class FeedbackError(AgentFinetuneError, ValueError):
    """A feedback post is malformed: not JSON, too large or too deep, a bad id or score."""


class UnknownResponseError(FeedbackError, LookupError):
    """Feedback names a response id the serving fleet did not issue (or no longer keeps)."""

    def __str__(self) -> str:  # LookupError would not quote, but be explicit like NotFound
        return str(self.args[0]) if self.args else ""


class GateRefusedError(AgentFinetuneError, RuntimeError):
    """The promotion gate kept the live version: the candidate was not better.

    Not a failure of the tool: the CLI exits with its own code (3) so scripts can tell.
    """


class DemoError(AgentFinetuneError, RuntimeError):
    """A demo step did not do what it should."""
