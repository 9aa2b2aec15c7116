"""What every settings table shares: the base class (unknown keys refused), the error the loader
raises, and which files are pickles (never loaded: they can run code)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ConfigError(Exception):
    """The configuration is invalid; the message is one line naming the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


__all__ = ["PICKLE_SUFFIXES", "ConfigError", "Section"]
