"""Where settings come from, highest first: what the program passes, the contract's short
environment names, `ATELIER_<SECTION>__<KEY>` variables, then the operator's TOML file
(`ATELIER_CONFIG`, or config/atelier.toml when it exists); the defaults are the classes' own
(config.settings). A `[models]` or `[generation.aspects]` table is given whole by the highest
source that has one (WHOLE_TABLES)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from config.section import ConfigError

DEFAULT_CONFIG_PATH = Path("config/atelier.toml")

# The contract's short environment names, mapped to their place in the settings tree.
SHORT_ENV_NAMES: dict[str, tuple[str, str]] = {
    "ATELIER_DATABASE_URL": ("database", "url"),
    "ATELIER_DISCORD_API_BASE": ("discord", "api_base"),
    "ATELIER_DISCORD_GATEWAY": ("discord", "gateway"),
    "ATELIER_DEV_GUILD_ID": ("discord", "dev_guild_id"),
}

# Tables a source gives whole: a model list or a size list half-merged from two places (the
# shipped hub model plus the operator's local one) is never what anyone means. The plain rule:
# the highest source that has such a table gives all of it.
WHOLE_TABLES: tuple[tuple[str, ...], ...] = (("models",), ("generation", "aspects"))


def _has(data: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return False
        data = data[key]
    return True


class WholeTables(PydanticBaseSettingsSource):
    """A source without the WHOLE_TABLES that a higher source already gives."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        inner: PydanticBaseSettingsSource,
        *,
        higher: list[PydanticBaseSettingsSource],
    ) -> None:
        super().__init__(settings_cls)
        self.inner = inner
        self.higher = higher

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = self.inner()
        given = [source() for source in self.higher]
        for path in WHOLE_TABLES:
            if _has(data, path) and any(_has(higher, path) for higher in given):
                *parents, last = path
                table = data
                for key in parents:
                    table[key] = dict(table[key])  # a copy: the inner source's data stays as it was
                    table = table[key]
                del table[last]
        return data


def _operator_file(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def config_path_from_env(environ: Mapping[str, str]) -> Path | None:
    """ATELIER_CONFIG names the file; the default path is used only when it exists."""
    explicit = environ.get("ATELIER_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"ATELIER_CONFIG: no such file {explicit}")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


class ShortEnvSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for env_name, (section, key) in SHORT_ENV_NAMES.items():
            if env_name in os.environ:
                data.setdefault(section, {})[key] = os.environ[env_name]
        return data


def ordered_sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of `settings_cls`, highest first (see the module docstring)."""
    sources: list[PydanticBaseSettingsSource] = [init_settings, ShortEnvSource(settings_cls), env_settings]
    path = config_path_from_env(os.environ)
    if path is not None:
        sources.append(_operator_file(settings_cls, path))
    return tuple(WholeTables(settings_cls, source, higher=sources[:i]) for i, source in enumerate(sources))


__all__ = ["DEFAULT_CONFIG_PATH", "SHORT_ENV_NAMES", "WHOLE_TABLES", "config_path_from_env", "ordered_sources"]
