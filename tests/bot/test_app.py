"""The Bot subclass's process-level set-up: its HTTP pool to Discord and its frozen start-up heap."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from bot.app import discord_connector, freeze_startup_heap
from config.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("http_connections", "options", "limit"),
    [
        (32, {}, 33),  # one gateway connection
        (32, {"shard_count": 4, "shard_ids": None}, 36),  # every shard in this process
        (8, {"shard_count": 10, "shard_ids": [2, 3]}, 10),  # two of ten shards here
        (0, {"shard_count": 4}, 0),  # 0: no limit, as discord.py's own pool
    ],
)
async def test_the_discord_pool_has_the_rest_connections_plus_one_per_gateway_shard(
    http_connections: int, options: dict[str, Any], limit: int
) -> None:
    settings = load_settings(discord={"http_connections": http_connections})
    connector = discord_connector(settings, options)
    try:
        assert connector.limit == limit
    finally:
        await connector.close()


def test_http_connections_defaults_to_32_and_refuses_negatives() -> None:
    assert load_settings().discord.http_connections == 32
    with pytest.raises(ConfigError, match="http_connections"):
        load_settings(discord={"http_connections": -1})


def test_freezing_the_start_up_heap_leaves_it_out_of_full_collections() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this interpreter's modules, classes and functions
        gc.collect()  # a full collection now walks only what came after
        assert gc.get_freeze_count() == frozen
        assert len(gc.get_objects()) < frozen
    finally:
        gc.unfreeze()
