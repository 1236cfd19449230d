"""AgentConfig: which adapter (and optionally which pinned version) each agent role uses."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_finetune.errors import ConfigError
from agent_finetune.registry.names import check_name, model_id, openai_base_url
from agent_finetune.training.config import read_text_file


class RoleConfig(BaseModel):
    """One role of the agent and the adapter it calls."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="Registry adapter name, sent as the OpenAI `model`.")
    version: str | None = Field(
        None, description="Pin this version (vNNNN); None follows the adapter's current version."
    )
    system_prompt: str | None = Field(None, description="System message for this role.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(256, ge=1, description="Longest reply in tokens.")

    @property
    def model(self) -> str:
        """The OpenAI `model` string: `name` or `name@vNNNN`."""
        return model_id(check_name(self.adapter), self.version)


class AgentConfig(BaseModel):
    """Server address and the roles of an agent (configs/agent.yaml)."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field("http://127.0.0.1:8000/v1", description="Server URL, with or without /v1.")
    api_key: str = Field("EMPTY", description="API key (vLLM's --api-key), or EMPTY.")
    roles: dict[str, RoleConfig] = Field(description="Role name -> adapter settings.")

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's ``base_url`` (``.../v1``)."""
        return openai_base_url(self.server)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> AgentConfig:
        p = Path(path)
        text = read_text_file(p, "agent config")
        try:
            raw = yaml.safe_load(text) or {}
            config = cls(**raw)
            for role in config.roles.values():
                _ = role.model  # validates names and versions
            return config
        except (yaml.YAMLError, ValidationError, ValueError, TypeError) as e:
            raise ConfigError(f"{p}: {e}") from None
