"""A member's own defaults (/settings, migration 0003) on both backends: Remix and the /generate
defaults, set one at a time, reset with None, kept beside the member's default model."""

from __future__ import annotations

import pytest

from db.moderation import MemberSettings, ModerationStore
from db.session import Database
from tests.db.conftest import FakeClock

U = 42


@pytest.fixture
def mod(db: Database, clock: FakeClock) -> ModerationStore:
    return ModerationStore(db, clock=clock)


async def test_defaults_until_set_then_each_setting_on_its_own(mod: ModerationStore) -> None:
    assert await mod.get_member_settings(U) == MemberSettings()
    assert (await mod.set_member_settings(U, remix=True)).remix is True
    await mod.set_member_settings(U, aspect="4:5", steps=20, sampler="euler", negative="blurry")
    assert await mod.get_member_settings(U) == MemberSettings(True, "4:5", 20, "euler", "blurry")
    await mod.set_member_settings(U, steps=None, remix=False)  # back to the operator's default
    assert await mod.get_member_settings(U) == MemberSettings(False, "4:5", None, "euler", "blurry")
    assert await mod.get_member_settings(U + 1) == MemberSettings()
    with pytest.raises(ValueError, match="unknown"):
        await mod.set_member_settings(U, model="x")


async def test_shares_the_row_with_the_default_model(db: Database, mod: ModerationStore, clock: FakeClock) -> None:
    await mod.set_user_default_model(U, "juggernaut")
    assert await mod.get_member_settings(U) == MemberSettings()  # a row from before: remix off
    await mod.set_member_settings(U, remix=True)
    assert await mod.get_user_default_model(U) == "juggernaut"
    fresh = ModerationStore(db, clock=clock)  # another process: reads the database
    assert (await fresh.get_member_settings(U)).remix is True
    assert await fresh.get_user_default_model(U) == "juggernaut"
