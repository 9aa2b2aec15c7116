"""Atelier's settings: the defaults written in the classes below ← the operator's TOML file ←
environment variables (pydantic-settings' own TOML and env sources).

Every key can be overridden by `ATELIER_<SECTION>__<KEY>` (for example
`ATELIER_ENGINE__DEVICE=cuda`). The contract also names a few short variables
(`ATELIER_DATABASE_URL`, `ATELIER_DISCORD_API_BASE`, `ATELIER_DISCORD_GATEWAY`,
`ATELIER_DEV_GUILD_ID`); they win over everything else. A `[models]` or `[generation.aspects]`
table replaces the default one instead of merging into it (config.sources, WHOLE_TABLES).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.addons import (
    ADDON_NAME,
    ADDON_NAME_RULE,
    ControlNetSettings,
    EmbeddingSettings,
    LoraSettings,
    ModelSettings,
    StyleSettings,
    parse_lora_ref,
)
from config.section import ConfigError, Section
from config.sources import ordered_sources
from engine.options import CONTROL_MODES, SAMPLERS

# Discord bot tokens are three base64url parts: user id, timestamp, HMAC.
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{17,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$")


def is_loopback_host(host: str | None) -> bool:
    """Whether a URL's host is this machine (where plain http cannot leak the token)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DiscordSettings(Section):
    api_base: str = "https://discord.com/api/v10"
    gateway: str = "wss://gateway.discord.gg/"
    dev_guild_id: int = 0
    # Servers the bot may serve; empty = any server. Anyone can add a public bot to a server
    # they own, so an operator who wants one community lists it here (the bot leaves the others).
    guilds: list[int] = Field(default_factory=list)
    allow_dms: bool = False
    moderator_roles: list[int] = Field(default_factory=list)
    priority_roles: list[int] = Field(default_factory=list)
    shard_count: int = Field(0, ge=0)
    shard_ids: list[int] = Field(default_factory=list)
    http_connections: int = Field(32, ge=0)
    # Per member: at most `cooldown_uses` commands and clicks that start jobs per
    # `cooldown_seconds` (0 uses = no cooldown). Refused ones cost nothing and touch nothing.
    cooldown_uses: int = Field(10, ge=0)
    cooldown_seconds: float = Field(60.0, gt=0)

    @field_validator("api_base", "gateway")
    @classmethod
    def _encrypted_unless_local(cls, url: str) -> str:
        # The bot token travels in every REST request's header: never in clear over a network.
        parsed = urlsplit(url)
        if parsed.scheme not in ("https", "wss", "http", "ws"):
            raise ValueError(f"{url!r} must be an https:// (wss:// for the gateway) URL")
        if parsed.scheme in ("http", "ws") and not is_loopback_host(parsed.hostname):
            raise ValueError(
                f"{url!r} is not encrypted: use https:// (wss:// for the gateway); plain http is only "
                "allowed for a server on this machine (127.0.0.1, ::1, localhost)"
            )
        return url

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
    # LoRA adapters kept loaded in each model (MB of their weights): recently used ones stay, so
    # switching between them costs no reading from disk; least recently used ones leave first.
    lora_cache_mb: int = Field(2048, ge=0)
    ray_address: str = ""
    ray_replicas: int = Field(1, ge=1)
    ray_num_gpus: float = Field(1.0, ge=0)
    ray_num_cpus: float = Field(1.0, ge=0)
    ray_app: str = Field("atelier", min_length=1)
    # The most images one batched pipeline call makes when queued jobs of the same shape run
    # together (bot.queue.scheduler); 0: by device (`batch_limit`).
    max_batch: int = Field(0, ge=0, le=16)

    def batch_limit(self, device_type: str) -> int:
        """`max_batch`, or the default for a device type: 1 (no batching) on a CPU, whose tiny
        share of work per image gains little from it; 4 elsewhere (a count-4 job's batch)."""
        if self.max_batch:
            return self.max_batch
        return 1 if device_type == "cpu" else 4

    @field_validator("upscaler")
    @classmethod
    def _safetensors_upscaler(cls, path: str) -> str:
        if path and not path.lower().endswith(".safetensors"):
            raise ValueError(f"{path!r}: the upscaler must be a .safetensors file (nothing else is read)")
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
    # SDXL works at about 1 megapixel: 4 MP leaves room for edits and upscales of large images
    # while keeping what one upload makes the bot decode to ~12 MB of pixels.
    max_attachment_pixels: int = Field(2048 * 2048, ge=64 * 64)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    upscale_strength: float = Field(0.3, ge=0.05, le=1.0)
    upscale_steps: int = Field(20, ge=1, le=60)
    upscale_max_side: int = Field(4096, ge=512)
    # SDXL's training buckets (about one megapixel each); the first is the default choice.
    aspects: dict[str, str] = Field(
        default_factory=lambda: {
            "1:1": "1024x1024",
            "4:5": "896x1152",
            "5:4": "1152x896",
            "2:3": "832x1216",
            "3:2": "1216x832",
            "9:16": "768x1344",
            "16:9": "1344x768",
            "9:21": "640x1536",
            "21:9": "1536x640",
        }
    )

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
        if sampler not in SAMPLERS:
            raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
        return sampler

    def aspect_sizes(self) -> dict[str, tuple[int, int]]:
        return {name: parse_size(size) for name, size in self.aspects.items()}


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
    # Outputs and inputs older than this are deleted (0 = kept until max_gb needs the room).
    # `retention_days` is this key's earlier name.
    keep_days: float = Field(30, ge=0, validation_alias=AliasChoices("keep_days", "retention_days"))
    max_gb: float = Field(20.0, ge=0)


class ModerationSettings(Section):
    # Operator-wide blocklist (RE2 regular expressions, case-insensitive), checked in every server
    # and DM besides each server's own list; the bot compiles them at start-up (bot.blocklists).
    blocklist: list[str] = Field(default_factory=list)


class MetricsSettings(Section):
    port: int = Field(0, ge=0, le=65535)
    # Loopback by default: the metrics name servers and users' activity; open it on purpose.
    host: str = "127.0.0.1"


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
    models: dict[str, ModelSettings] = Field(
        default_factory=lambda: {
            "sdxl": ModelSettings(
                base="stabilityai/stable-diffusion-xl-base-1.0",
                refiner="stabilityai/stable-diffusion-xl-refiner-1.0",
                default=True,
            )
        }
    )
    # ControlNet modes offered on /generate (see ControlNetSettings); none by default.
    controlnets: dict[str, ControlNetSettings] = Field(default_factory=dict)
    loras: dict[str, LoraSettings] = Field(default_factory=dict)
    embeddings: dict[str, EmbeddingSettings] = Field(default_factory=dict)
    styles: dict[str, StyleSettings] = Field(default_factory=dict)
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

    @model_validator(mode="after")
    def _known_control_modes(self) -> Settings:
        for mode, table in self.controlnets.items():
            if mode not in CONTROL_MODES:
                raise ValueError(f"controlnets.{mode}: unknown mode; the modes are {', '.join(CONTROL_MODES)}")
            if mode == "edges" and table.annotator:
                raise ValueError("controlnets.edges.annotator: edges are found by Canny, without a model")
            if mode != "edges" and not table.annotator:
                raise ValueError(
                    f"controlnets.{mode}.annotator: set it to the {mode} estimator (a hub id or a local folder)"
                )
        return self

    @model_validator(mode="after")
    def _addons_known(self) -> Settings:
        for section, table in (("loras", self.loras), ("embeddings", self.embeddings), ("styles", self.styles)):
            for name in table:
                if not ADDON_NAME.match(name):
                    raise ValueError(f"{section}.{name}: the name must be {ADDON_NAME_RULE}")
        if len(self.styles) > 25:
            raise ValueError("styles: at most 25 (Discord shows at most 25 choices)")
        for name, lora in self.loras.items():
            unknown = [model for model in lora.models if model not in self.models]
            if unknown:
                known = ", ".join(self.models)
                raise ValueError(f"loras.{name}.models: no model {', '.join(unknown)} (models: {known})")
        for name, style in self.styles.items():
            for ref in style.loras:
                wanted = parse_lora_ref(ref)[0]
                if wanted not in self.loras:
                    known = ", ".join(self.loras) or "none configured"
                    raise ValueError(f"styles.{name}.loras: no LoRA {wanted!r} (loras: {known})")
        return self

    @property
    def control_modes(self) -> list[str]:
        """The configured ControlNet modes, in the order /generate offers them."""
        return [mode for mode in CONTROL_MODES if mode in self.controlnets]

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
        return ordered_sources(settings_cls, init_settings, env_settings)


def _describe(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"] if part != "__root__")
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{location}: {message}" if location else message


def load_settings(**overrides: Any) -> Settings:
    """Load and validate the settings; raise ConfigError with one line naming the bad key."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"invalid config: {_describe(first)}{suffix}") from None


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
