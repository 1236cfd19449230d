"""Every error that agent_finetune and server_plugin raise on purpose.

Every class also subclasses the built-in that callers already catch::

    AgentFinetuneError
    ├── ConfigError(AgentFinetuneError, ValueError)        bad YAML / field value
    ├── DataError(AgentFinetuneError, ValueError)          bad dataset file / row
    ├── PromptTemplateError(AgentFinetuneError, ValueError) unknown placeholder
    ├── BackendError(AgentFinetuneError, RuntimeError)     backend unavailable
    ├── UnservableAdapterError(AgentFinetuneError, ValueError)  vLLM could not serve it
    ├── RegistryError(AgentFinetuneError, RuntimeError)    registry operation failed
    │   ├── InvalidNameError(RegistryError, ValueError)
    │   ├── NotFoundError(RegistryError, KeyError)
    │   └── ValidationError(RegistryError, ValueError)     adapter failed validation
    ├── LoadError(AgentFinetuneError, RuntimeError)        the vLLM server refused a load/swap
    ├── VllmCompatError(AgentFinetuneError, RuntimeError)  this vLLM lacks what the plugin uses
    ├── AskError(AgentFinetuneError, RuntimeError)         `ask`: server down or name unknown
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


class ValidationError(RegistryError, ValueError):
    """An adapter version failed validation; ``problems`` lists every cause."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class LoadError(AgentFinetuneError, RuntimeError):
    """The vLLM server refused to load, repoint or unload an adapter."""


class VllmCompatError(AgentFinetuneError, RuntimeError):
    """The installed vLLM lacks an internal the plugin uses, or runs in a mode it cannot
    serve (``server_plugin.compat``)."""


class AskError(AgentFinetuneError, RuntimeError):
    """The server is down, or does not serve the requested adapter."""


class DemoError(AgentFinetuneError, RuntimeError):
    """A demo step did not do what it should."""
