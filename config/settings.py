"""Atelier's settings: shipped defaults ← the operator's TOML file ← environment variables.

Every key can be overridden by `ATELIER_<SECTION>__<KEY>` (for example
`ATELIER_ENGINE__DEVICE=cuda`). The contract also names a few short variables
(`ATELIER_DATABASE_URL`, `ATELIER_DISCORD_API_BASE`, `ATELIER_DISCORD_GATEWAY`,
`ATELIER_DEV_GUILD_ID`); they win over everything else. A `[models]` section in the
operator's file replaces the shipped model list instead of merging into it, because a
half-merged model list (the shipped hub model plus the operator's local one) is never
what an operator means.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
DEFAULT_CONFIG_PATH = Path("config/atelier.toml")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# The contract's short environment names, mapped to their place in the settings tree.
SHORT_ENV_NAMES: dict[str, tuple[str, str]] = {
    "ATELIER_DATABASE_URL": ("database", "url"),
    "ATELIER_DISCORD_API_BASE": ("discord", "api_base"),
    "ATELIER_DISCORD_GATEWAY": ("discord", "gateway"),
    "ATELIER_DEV_GUILD_ID": ("discord", "dev_guild_id"),
}

# Discord bot tokens are three base64url parts: user id, timestamp, HMAC.
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{17,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$")


class ConfigError(Exception):
    """The configuration is invalid; the message is one line naming the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DiscordSettings(Section):
    api_base: str = "https://discord.com/api/v10"
    gateway: str = "wss://gateway.discord.gg/"
    dev_guild_id: int = 0
    allow_dms: bool = True
    moderator_roles: list[int] = Field(default_factory=list)
    priority_roles: list[int] = Field(default_factory=list)
    shard_count: int = Field(0, ge=0)
    shard_ids: list[int] = Field(default_factory=list)
    http_connections: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _shards_in_range(self) -> DiscordSettings:
        if self.shard_ids and not self.shard_count:
            raise ValueError("shard_ids needs shard_count (the total number of shards)")
        wrong = [i for i in self.shard_ids if not 0 <= i < self.shard_count]
        if wrong:
            raise ValueError(f"shard_ids {wrong} are outside 0..{self.shard_count - 1} (the shard_count)")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("shard_ids lists a shard twice")
        return self


class DatabaseSettings(Section):
    url: str = "sqlite+aiosqlite:///data/atelier.db"
    shared: bool = False
    resync_seconds: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_driver(cls, url: str) -> str:
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return url

    @model_validator(mode="after")
    def _shared_needs_postgres(self) -> DatabaseSettings:
        # SQLite is one file on one machine: processes cannot LISTEN, hold advisory locks or
        # reach it from other hosts, so "shared" would silently run two dispatchers.
        if self.shared and not self.url.startswith("postgresql+asyncpg://"):
            raise ValueError("shared = true needs PostgreSQL: set url to postgresql+asyncpg://...")
        return self


class EngineSettings(Section):
    backend: Literal["local", "ray"] = "local"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    compile: bool = False
    fuse_qkv: bool = False
    channels_last: bool = True
    vae_tiling_above: int = Field(2048, ge=256)
    cfg_cutoff: float = Field(0.0, ge=0.0, le=1.0)
    high_noise_frac: float = Field(0.8, gt=0.0, lt=1.0)
    preview_every: int = Field(5, ge=0)
    preview_size: int = Field(128, ge=32, le=512)
    models_in_ram: int = Field(1, ge=0)
    torch_threads: int = Field(0, ge=0)
    warmup: bool = False
    start_timeout: float = Field(600.0, gt=0)
    upscaler: str = ""
    ray_address: str = ""
    ray_replicas: int = Field(1, ge=1)
    ray_num_gpus: float = Field(1.0, ge=0)
    ray_num_cpus: float = Field(1.0, ge=0)
    ray_app: str = Field("atelier", min_length=1)

    @field_validator("upscaler")
    @classmethod
    def _no_pickle_upscaler(cls, path: str) -> str:
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(f"{path!r} is a pickle checkpoint; use a .safetensors file")
        return path


def parse_size(text: str) -> tuple[int, int]:
    """'896x1152' → (896, 1152), both multiples of 64."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not of the form WxH")
    width, height = int(match[1]), int(match[2])
    if width % 64 or height % 64 or not (256 <= width <= 4096 and 256 <= height <= 4096):
        raise ValueError(f"{text!r}: width and height must be multiples of 64 between 256 and 4096")
    return width, height


class GenerationSettings(Section):
    default_steps: int = Field(30, ge=1, le=60)
    default_cfg: float = Field(7.0, ge=1.0, le=20.0)
    default_sampler: str = "dpmpp_2m_karras"
    max_prompt_chars: int = Field(1500, ge=1, le=6000)
    max_attachment_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_attachment_pixels: int = Field(4096 * 4096, ge=64 * 64)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    upscale_strength: float = Field(0.3, ge=0.05, le=1.0)
    upscale_steps: int = Field(20, ge=1, le=60)
    upscale_max_side: int = Field(4096, ge=512)
    aspects: dict[str, str] = Field(default_factory=lambda: {"1:1": "1024x1024"})

    @field_validator("aspects")
    @classmethod
    def _valid_aspects(cls, aspects: dict[str, str]) -> dict[str, str]:
        if not aspects:
            raise ValueError("needs at least one size")
        if len(aspects) > 25:
            raise ValueError("at most 25 sizes (Discord shows at most 25 choices)")
        for name, size in aspects.items():
            try:
                parse_size(size)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return aspects

    @field_validator("default_sampler")
    @classmethod
    def _known_sampler(cls, sampler: str) -> str:
        from engine.spec import SAMPLERS

        if sampler not in SAMPLERS:
            raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
        return sampler

    def aspect_sizes(self) -> dict[str, tuple[int, int]]:
        return {name: parse_size(size) for name, size in self.aspects.items()}


class ModelSettings(Section):
    base: str
    refiner: str = ""
    base_config: str = ""
    refiner_config: str = ""
    default: bool = False
    description: str = ""

    @field_validator("base", "refiner")
    @classmethod
    def _no_pickle(cls, source: str) -> str:
        if source.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(
                f"{source!r} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors"
            )
        return source


class QuotaSettings(Section):
    window_hours: float = Field(24.0, gt=0)
    default_limit: float = Field(40.0, ge=0)
    moderators_exempt: bool = True


class QueueSettings(Section):
    per_user_cap: int = Field(3, ge=1)
    global_cap: int = Field(100, ge=1)
    max_attempts: int = Field(3, ge=1)
    aging_seconds: float = Field(300.0, gt=0)


class SafetySettings(Section):
    enabled: bool = True
    action: Literal["withhold", "spoiler"] = "withhold"
    threshold: float = Field(0.6, ge=0.0, le=1.0)
    explicit_labels: list[str] = Field(
        default_factory=lambda: [
            "FEMALE_GENITALIA_EXPOSED",
            "MALE_GENITALIA_EXPOSED",
            "FEMALE_BREAST_EXPOSED",
            "BUTTOCKS_EXPOSED",
            "ANUS_EXPOSED",
        ]
    )


class StorageSettings(Section):
    output_dir: str = "data/outputs"
    retention_days: float = Field(30, ge=0)
    max_gb: float = Field(20.0, ge=0)


class ModerationSettings(Section):
    # Operator-wide blocklist (regex, case-insensitive), checked besides each server's own list.
    blocklist: list[str] = Field(default_factory=list)

    @field_validator("blocklist")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


class MetricsSettings(Section):
    port: int = Field(0, ge=0, le=65535)


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATELIER_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _one_default_model(self) -> Settings:
        if not self.models:
            raise ValueError("models: at least one [models.<name>] table is required")
        defaults = [name for name, model in self.models.items() if model.default]
        if len(defaults) > 1:
            raise ValueError(f"models: only one model may have default = true (found {', '.join(defaults)})")
        if not defaults:
            if len(self.models) > 1:
                raise ValueError("models: mark one model with default = true")
            only = next(iter(self.models))
            self.models[only] = self.models[only].model_copy(update={"default": True})
        return self

    @property
    def default_model(self) -> str:
        return next(name for name, model in self.models.items() if model.default)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            ShortEnvSource(settings_cls),
            env_settings,
            TomlFilesSource(settings_cls),
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merged_toml(config_path: Path | None) -> dict[str, Any]:
    """Shipped defaults with the operator's file merged over them ([models] replaced whole)."""
    data = _read_toml(DEFAULTS_FILE)
    if config_path is not None:
        user = _read_toml(config_path)
        if "models" in user:
            data.pop("models", None)
        if "aspects" in (user.get("generation") or {}):
            data.get("generation", {}).pop("aspects", None)  # the operator's sizes replace ours
        data = deep_merge(data, user)
    return data


def config_path_from_env(environ: Mapping[str, str]) -> Path | None:
    """ATELIER_CONFIG names the file; the default path is used only when it exists."""
    explicit = environ.get("ATELIER_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"ATELIER_CONFIG: no such file {explicit}")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


# Set while load_settings() is given its own [models]: like a [models] table in the operator's
# file, programmatic models replace the file's list instead of merging into it.
_MODELS_GIVEN: ContextVar[bool] = ContextVar("models_given", default=False)
# The same for [generation.aspects]: the sizes given replace the shipped buckets, not extend them.
_ASPECTS_GIVEN: ContextVar[bool] = ContextVar("aspects_given", default=False)


class TomlFilesSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._data = merged_toml(config_path_from_env(os.environ))
        if _MODELS_GIVEN.get():
            self._data.pop("models", None)
        if _ASPECTS_GIVEN.get():
            self._data.get("generation", {}).pop("aspects", None)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


class ShortEnvSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for env_name, (section, key) in SHORT_ENV_NAMES.items():
            if env_name in os.environ:
                data.setdefault(section, {})[key] = os.environ[env_name]
        return data


def _describe(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"] if part != "__root__")
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{location}: {message}" if location else message


def load_settings(**overrides: Any) -> Settings:
    """Load and validate the settings; raise ConfigError with one line naming the bad key."""
    token = _MODELS_GIVEN.set("models" in overrides)
    generation = overrides.get("generation")
    aspects_token = _ASPECTS_GIVEN.set(isinstance(generation, Mapping) and "aspects" in generation)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"invalid config: {_describe(first)}{suffix}") from None
    finally:
        _MODELS_GIVEN.reset(token)
        _ASPECTS_GIVEN.reset(aspects_token)


def read_token(environ: Mapping[str, str]) -> str:
    """DISCORD_TOKEN, checked for shape; raise ConfigError (never echoing the token) when bad."""
    token = environ.get("DISCORD_TOKEN", "").strip()
    if not token:
        raise ConfigError("DISCORD_TOKEN is not set: set it to the bot token from the developer portal")
    if not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError("DISCORD_TOKEN is malformed: expected a bot token of three dot-separated parts")
    return token


__all__ = [
    "ConfigError",
    "Settings",
    "load_settings",
    "parse_size",
    "read_token",
]
