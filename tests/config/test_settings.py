"""Settings: shipped defaults, the operator's TOML merged over them, env overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from config.settings import ConfigError, Settings, load_settings, parse_size, read_token

EXAMPLE = Path(__file__).parents[2] / "config" / "atelier.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ATELIER_") or name == "DISCORD_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray config/atelier.toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "atelier.toml"
    path.write_text(text)
    return path


def keys(table: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in table.items():
        if isinstance(value, dict) and key not in ("aspects", "models"):
            found |= keys(value, f"{prefix}{key}.")
        else:
            found.add(f"{prefix}{key}")
    return found


def test_defaults_load() -> None:
    settings = load_settings()
    assert settings.default_model == "sdxl"
    assert settings.database.url == "sqlite+aiosqlite:///data/atelier.db"
    assert settings.generation.aspect_sizes()["1:1"] == (1024, 1024)
    assert list(settings.generation.aspects)[0] == "1:1"


def test_example_documents_every_key_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings.model_construct().model_dump(exclude={"models"})  # the classes' own defaults
    example = tomllib.loads(EXAMPLE.read_text())
    assert keys(defaults) == keys(example) - {"models"}
    shipped = load_settings().model_dump(exclude={"models"})
    monkeypatch.setenv("ATELIER_CONFIG", str(EXAMPLE))
    # The example shows the shipped values, so copying it changes nothing until edited.
    assert load_settings().model_dump(exclude={"models"}) == shipped


def test_user_file_merges_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[quota]\ndefault_limit = 5\n[engine]\ndtype = 'bf16'\n")
    monkeypatch.setenv("ATELIER_CONFIG", str(path))
    settings = load_settings()
    assert settings.quota.default_limit == 5
    assert settings.quota.window_hours == 24  # untouched keys keep their default
    assert settings.engine.dtype == "bf16"
    assert settings.default_model == "sdxl"


def test_models_section_replaces_shipped_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[models.mine]\nbase = '/models/mine'\n")
    monkeypatch.setenv("ATELIER_CONFIG", str(path))
    settings = load_settings()
    assert list(settings.models) == ["mine"]
    assert settings.default_model == "mine"  # the only model is the default


def test_env_overrides_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[quota]\ndefault_limit = 5\n")
    monkeypatch.setenv("ATELIER_CONFIG", str(path))
    monkeypatch.setenv("ATELIER_QUOTA__DEFAULT_LIMIT", "7.5")
    monkeypatch.setenv("ATELIER_ENGINE__COMPILE", "true")
    monkeypatch.setenv("ATELIER_DATABASE_URL", "postgresql+asyncpg://u@h/db")
    monkeypatch.setenv("ATELIER_DISCORD_API_BASE", "http://127.0.0.1:9/api/v10")
    monkeypatch.setenv("ATELIER_DISCORD_GATEWAY", "ws://127.0.0.1:9/gateway")
    monkeypatch.setenv("ATELIER_DEV_GUILD_ID", "1234")
    settings = load_settings()
    assert settings.quota.default_limit == 7.5
    assert settings.engine.compile is True
    assert settings.database.url == "postgresql+asyncpg://u@h/db"
    assert settings.discord.api_base == "http://127.0.0.1:9/api/v10"
    assert settings.discord.gateway == "ws://127.0.0.1:9/gateway"
    assert settings.discord.dev_guild_id == 1234


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[engine]\ndtype = 'fp17'\n", "engine.dtype"),
        ("[engine]\nturbo = true\n", "engine.turbo: unknown key"),
        ("[generation.aspects]\nodd = '1000x1000'\n", "generation.aspects"),
        ("[models.a]\nbase = '/m/a.ckpt'\n", "pickle"),
        ("[models.a]\nbase='/a'\ndefault=true\n[models.b]\nbase='/b'\ndefault=true\n", "only one model"),
        ("[models.a]\nbase='/a'\n[models.b]\nbase='/b'\n", "mark one model"),
        ("[database]\nurl = 'mysql://x'\n", "database.url"),
        ("not toml = = 1", "invalid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str) -> None:
    monkeypatch.setenv("ATELIER_CONFIG", str(write(tmp_path, text)))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert key in str(caught.value)
    assert "\n" not in str(caught.value)


def test_more_than_25_aspects_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = "\n".join(f'"a{i}" = "1024x1024"' for i in range(26))
    monkeypatch.setenv("ATELIER_CONFIG", str(write(tmp_path, f"[generation.aspects]\n{lines}\n")))
    with pytest.raises(ConfigError, match="at most 25"):
        load_settings()


def test_parse_size() -> None:
    assert parse_size("896x1152") == (896, 1152)
    for bad in ("1000x1000", "1024", "0x0", "64x64"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_token_shape() -> None:
    good = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"
    assert read_token({"DISCORD_TOKEN": good}) == good
    with pytest.raises(ConfigError, match="not set"):
        read_token({})
    with pytest.raises(ConfigError, match="malformed") as caught:
        read_token({"DISCORD_TOKEN": "hunter2"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_run_without_good_token_prints_one_line_and_exits_2(tmp_path: Path, token: str | None) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_") and k != "DISCORD_TOKEN"}
    if token is not None:
        env["DISCORD_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "bot"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "DISCORD_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr
    if token:
        assert token not in proc.stderr


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    import os

    path = write(tmp_path, "[engine]\ndevice = 'tpu'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env["ATELIER_CONFIG"] = str(path)
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "db", "upgrade"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "engine.device" in proc.stderr


def test_operator_aspects_replace_the_shipped_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Contract: an operator may replace the sizes; a table of two gives exactly two choices."""
    table = '[generation.aspects]\n"square" = "512x512"\n"wide" = "768x512"\n'
    monkeypatch.setenv("ATELIER_CONFIG", str(write(tmp_path, table)))
    assert load_settings().generation.aspect_sizes() == {"square": (512, 512), "wide": (768, 512)}
    given = load_settings(generation={"aspects": {"1:1": "256x256"}})
    assert given.generation.aspect_sizes() == {"1:1": (256, 256)}
    assert given.generation.default_steps == 30  # the rest of [generation] still merges


# ------------------------------------------------------------------------------ going public (issue 12)


def test_safe_defaults_for_a_public_bot() -> None:
    settings = load_settings()
    assert settings.discord.allow_dms is False
    assert settings.discord.guilds == []
    assert settings.metrics.host == "127.0.0.1"
    assert settings.discord.cooldown_uses > 0
    assert settings.generation.max_attachment_pixels <= 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://discord.com/api/v10", True),
        ("http://127.0.0.1:8080/api/v10", True),
        ("http://localhost:8080/api/v10", True),
        ("http://[::1]:8080/api/v10", True),
        ("http://discord.example.org/api/v10", False),
        ("http://10.0.0.2/api/v10", False),
        ("ftp://discord.com/api", False),
    ],
)
def test_discord_endpoints_are_encrypted_unless_on_this_machine(
    url: str, ok: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token travels in every REST request: plain http only to a server on this machine."""
    monkeypatch.setenv("ATELIER_DISCORD_API_BASE", url)
    if ok:
        assert load_settings().discord.api_base == url
    else:
        with pytest.raises(ConfigError, match=r"discord\.api_base"):
            load_settings()
    monkeypatch.delenv("ATELIER_DISCORD_API_BASE")
    monkeypatch.setenv("ATELIER_DISCORD_GATEWAY", url.replace("http", "ws"))
    if ok:
        load_settings()
    else:
        with pytest.raises(ConfigError, match=r"discord\.gateway"):
            load_settings()


def test_keep_days_also_reads_its_earlier_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_CONFIG", str(write(tmp_path, "[storage]\nretention_days = 3\n")))
    assert load_settings().storage.keep_days == 3


@pytest.mark.parametrize("path", ["/m/esrgan.pth", "/m/esrgan.bin", "/m/esrgan.onnx", "/m/esrgan"])
def test_the_upscaler_must_be_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("ATELIER_CONFIG", str(write(tmp_path, f"[engine]\nupscaler = '{path}'\n")))
    with pytest.raises(ConfigError, match=r"engine.upscaler: .*\.safetensors"):
        load_settings()
