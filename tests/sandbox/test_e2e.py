"""The real discord.py client against the sandbox: connect, commands, every interaction kind,
uploads, edits, DMs, late responses, expired tokens, rate limits, 5xx and gateway resumes.

Synchronisation is by waiting on sandbox/bot events, never by sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib

import discord
import pytest

from sandbox import InvocationError, write_transcript
from sandbox.records import EPHEMERAL

from .botkit import png_bytes
from .conftest import Running

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_connect_ready_and_sync(running: Running) -> None:
    sb, bot, w = running.sb, running.bot, running.world
    assert bot.user is not None and bot.user.id == sb.bot_user.id
    assert bot.application_id == sb.application_id
    guild = bot.get_guild(w.guild.id)
    assert guild is not None and guild.owner_id == sb.owner.id
    assert guild.get_channel(w.lounge.id).is_nsfw()
    assert not guild.get_channel(w.studio.id).is_nsfw()
    assert {r.name for r in guild.roles} >= {"@everyone", "Moderators", "Atelier"}
    assert {c.name for c in sb.registered_commands()} >= {"echo", "pick", "search", "mod", "upload"}
    assert "mod quota set" in next(c for c in sb.registered_commands() if c.name == "mod").qualified_paths
    assert sb.gateway.identify_count == 1


async def test_slash_command_message_and_buttons(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "hi", "times": 2})
    first = await inter.wait_response(3)
    assert first.type == 4 and first.content == "hi hi" and not first.ephemeral
    msg = inter.original
    assert msg is not None and msg.content == "hi hi" and msg.type == 20
    assert msg.interaction_meta is not None and msg.interaction_meta["name"] == "echo"
    assert [b["label"] for b in msg.buttons] == ["Count 0", "Ask"]
    assert msg.button("Count 0")["emoji"]["name"] == "🎲"
    assert inter.response_latency is not None and 0 <= inter.response_latency < 1.0
    assert msg in sb.channel_messages(w.studio)


async def test_invocations_are_checked_against_the_schema(running: Running) -> None:
    sb, w = running.sb, running.world
    with pytest.raises(InvocationError, match="required option 'text'"):
        await sb.slash(w.alice, w.studio, "echo", {})
    with pytest.raises(InvocationError, match=r"outside 1\.\.3"):
        await sb.slash(w.alice, w.studio, "echo", {"text": "x", "times": 9})
    with pytest.raises(InvocationError, match="length 101"):
        await sb.slash(w.alice, w.studio, "echo", {"text": "x" * 101})
    with pytest.raises(InvocationError, match="not one of the choices"):
        await sb.slash(w.alice, w.studio, "pick", {"flavour": "mint"})
    with pytest.raises(InvocationError, match="unknown option"):
        await sb.slash(w.alice, w.studio, "echo", {"text": "x", "colour": "red"})
    with pytest.raises(InvocationError, match="is a group"):
        await sb.slash(w.alice, w.studio, "mod quota", {})
    with pytest.raises(InvocationError, match="not registered"):
        await sb.slash(w.alice, w.studio, "nope", {})
    with pytest.raises(InvocationError, match="not available in DMs"):
        await sb.slash(w.alice, sb.dm_channel(w.alice), "mod quota set", {"user": w.bob, "limit": 1})


async def test_choice_and_ephemeral(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.bob, w.studio, "pick", {"flavour": "chocolate"})
    first = await inter.wait_response()
    assert first.content == "picked chocolate" and first.ephemeral
    assert inter.original is not None and inter.original.flags & EPHEMERAL
    assert inter.original.visible_to == w.bob.id


async def test_subcommand_group_with_member_and_permissions(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.mod, w.studio, "mod quota set", {"user": w.alice, "limit": 5})
    assert (await inter.wait_response()).content == "set alice to 5 (manage_guild=True)"
    member = inter.payload["member"]
    assert int(member["permissions"]) & (1 << 5) and member["roles"] == [str(w.mod_role.id)]
    assert inter.payload["data"]["resolved"]["members"][str(w.alice.id)]["permissions"]
    other = await sb.slash(w.bob, w.studio, "mod quota set", {"user": w.alice, "limit": 0})
    assert (await other.wait_response()).content.endswith("(manage_guild=False)")


async def test_autocomplete(running: Running) -> None:
    sb, w = running.sb, running.world
    choices = await sb.autocomplete(w.alice, w.studio, "search", {"query": "ch"}, focused="query")
    assert choices == [{"name": "Chocolate", "value": "chocolate"}]
    everything = await sb.autocomplete(w.alice, w.studio, "search", {}, focused="query")
    assert len(everything) == 4


async def test_attachment_option_round_trips_bytes(running: Running) -> None:
    sb, w = running.sb, running.world
    image = png_bytes(16, 9)
    inter = await sb.slash(w.alice, w.studio, "upload", attachments=[("cat.png", image, "image/png")])
    first = await inter.wait_response()
    assert first.content == f"cat.png 16x9 {hashlib.sha256(image).hexdigest()}"
    [returned] = first.files
    assert returned.filename == "back-cat.png" and returned.width == 16 and returned.height == 9
    assert returned.content_type == "image/png"
    assert sb.file_bytes(returned) == image
    assert await sb.download(returned.url) == image  # served by the sandbox CDN


async def test_component_click_updates_message(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "count me"})
    await inter.wait_response()
    msg = inter.original
    assert msg is not None
    click = await sb.click(w.bob, msg, label="Count 0")
    resp = await click.wait_response()
    assert resp.type == 7
    assert msg.content == "count 1 by bob" and msg.buttons[0]["custom_id"] == "tb:count:1"
    assert [h.content for h in msg.history] == ["count me"]
    assert click.payload["message"]["id"] == str(msg.id)
    again = await sb.click(w.alice, msg, "tb:count:1")
    await again.wait_response()
    assert msg.content == "count 2 by alice" and len(msg.history) == 2
    with pytest.raises(InvocationError):
        await sb.click(w.alice, msg, "tb:count:99")


async def test_select_menu(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.alice, w.studio, "menu")
    await inter.wait_response()
    msg = inter.original
    with pytest.raises(InvocationError, match="not among options"):
        await sb.click(w.alice, msg, "tb:flavours", values=["mint"])
    click = await sb.click(w.alice, msg, "tb:flavours", values=["vanilla", "pistachio"])
    await click.wait_response()
    assert msg.content == "chose vanilla, pistachio" and msg.components == []


async def test_message_content_intent_is_applied(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    plain = await sb.send_as_user(w.alice, w.studio, "hello bot")
    await rec.wait_flag(f"seen:{plain.id}")
    assert rec.seen[-1].content == ""  # the test bot has no message_content intent
    mention = await sb.send_as_user(w.alice, w.studio, f"<@{sb.bot_user.id}> hello")
    await rec.wait_flag(f"seen:{mention.id}")
    assert rec.seen[-1].content.endswith("hello") and rec.seen[-1].author.id == w.alice.id


async def test_modal_round_trip(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "ask me"})
    await inter.wait_response()
    opened = await sb.click(w.alice, inter.original, label="Ask")
    assert (await opened.wait_response()).type == 9 and opened.modal["title"] == "Tell me"
    submitted = await sb.submit_modal(w.alice, opened, {"tb:answer": "forty-two"})
    resp = await submitted.wait_response()
    assert resp.content == "modal said forty-two" and resp.ephemeral


async def test_defer_then_edit_original_with_file(running: Running) -> None:
    sb, w, bot = running.sb, running.world, running.bot
    inter = await sb.slash(w.alice, w.studio, "think")
    first = await inter.wait_response()
    assert first.type == 5
    assert inter.original is not None and inter.original.loading
    bot.release.set()
    msg = await inter.wait_original(lambda m: not m.loading)
    assert msg.content == "done thinking" and [a.filename for a in msg.attachments] == ["a.png"]
    assert msg.attachments[0].width == 4


async def test_edit_keeps_removes_and_adds_attachments(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    inter = await sb.slash(w.alice, w.studio, "album")
    await inter.wait_response()
    await rec.wait_flag("album")
    msg = inter.original
    assert msg is not None and msg.content == "album edited"
    first_version = msg.history[-1]
    assert [a.filename for a in first_version.attachments] == ["one.png", "two.png"]
    assert [a.filename for a in msg.attachments] == ["one.png", "three.png"]
    assert msg.attachments[0].id == first_version.attachments[0].id  # kept, not re-uploaded
    assert msg.attachments[1].width == 5 and sb.file_bytes(msg.attachments[1]) == png_bytes(5, 5)


async def test_bot_token_send_reply_and_edit(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    inter = await sb.slash(w.alice, w.studio, "post")
    await inter.wait_response()
    await rec.wait_flag("post")
    posted = await sb.wait_for_message(lambda m: m.content == "posted and edited", channel=w.studio)
    assert posted.attachments == [] and posted.history[0].attachments[0].filename == "post.png"
    assert posted.webhook_id is None and posted.author.id == sb.bot_user.id
    reply = await sb.wait_for_message(lambda m: m.content == "a reply")
    assert reply.type == 19 and reply.reference["message_id"] == str(posted.id)


async def test_late_response_is_unknown_interaction(running: Running) -> None:
    sb, w, bot, rec = running.sb, running.world, running.bot, running.rec
    sb.settings.response_window = 0.2  # Discord: 3 s; shortened to keep the test fast
    bot.slow_seconds = 0.35
    rec.error_seen.clear()
    try:
        inter = await sb.slash(w.alice, w.studio, "slow")
        assert await inter.wait_rejected(3) == ["unknown_interaction"]
        await asyncio.wait_for(rec.error_seen.wait(), 3)
    finally:
        sb.settings.response_window = 3.0
    exc = rec.errors[-1]
    assert isinstance(exc, discord.NotFound) and exc.code == 10062
    assert inter.response is None and inter.late


async def test_second_initial_response_is_rejected(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "once"})
    await inter.wait_response()
    url = f"{sb.api_base}/interactions/{inter.id}/{inter.token}/callback"
    async with aiohttp_session() as http, http.post(url, json={"type": 4, "data": {"content": "twice"}}) as r:
        assert r.status == 400 and (await r.json())["code"] == 40060
    assert "already_acknowledged" in inter.rejected


async def test_plain_callback_then_bot_double_acknowledges(running: Running) -> None:
    """A 204 callback without ?with_response; the bot's own (later) response then gets 40060."""
    sb, w, bot, rec = running.sb, running.world, running.bot, running.rec
    bot.slow_seconds = 0.2
    rec.error_seen.clear()
    inter = await sb.slash(w.alice, w.studio, "slow")
    url = f"{sb.api_base}/interactions/{inter.id}/{inter.token}/callback"
    async with aiohttp_session() as http, http.post(url, json={"type": 4, "data": {"content": "first!"}}) as r:
        assert r.status == 204
    await asyncio.wait_for(rec.error_seen.wait(), 3)
    exc = rec.errors[-1]
    assert isinstance(exc, discord.HTTPException) and exc.code == 40060
    assert inter.original.content == "first!" and inter.rejected == ["already_acknowledged"]


async def test_followup_edit_and_delete_via_webhook(running: Running) -> None:
    sb, w = running.sb, running.world
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "base"})
    await inter.wait_response()
    hook = f"{sb.api_base}/webhooks/{sb.application_id}/{inter.token}"
    async with aiohttp_session() as http:
        async with http.post(hook, params={"wait": "true"}, json={"content": "follow", "flags": 64}) as r:
            follow = await r.json()
        assert follow["flags"] == 64 and [m.content for m in inter.followups] == ["follow"]
        async with http.patch(f"{hook}/messages/{follow['id']}", json={"content": "follow 2"}) as r:
            assert (await r.json())["content"] == "follow 2"
        async with http.delete(f"{hook}/messages/@original") as r:
            assert r.status == 204
        async with http.get(f"{hook}/messages/@original") as r:
            assert r.status == 404 and (await r.json())["code"] == 10008
        async with http.get(f"{hook}/messages/{inter.original_message_id + 1}") as r:
            assert (await r.json())["code"] == 10008  # not a message of this interaction
    assert inter.original is None and inter.followups[0].history[0].content == "follow"
    hook_requests = [r.path for r in sb.requests if r.path.startswith("/webhooks/")]
    assert hook_requests and all("/***" in p and inter.token not in p for p in hook_requests)  # tokens redacted


async def test_expired_token_then_bot_token_fallback(running: Running) -> None:
    sb, w, bot, rec = running.sb, running.world, running.bot, running.rec
    inter = await sb.slash(w.bob, w.studio, "longjob")
    await inter.wait_response()
    inter.expire_token()  # as if the job had waited past the 15-minute token
    rec.error_seen.clear()
    bot.release.set()
    await rec.wait_flag("longjob")
    exc = rec.errors[-1]
    assert isinstance(exc, discord.HTTPException) and exc.status == 401 and exc.code == 50027
    await sb.wait_for_message(lambda m: m.content == f"result via bot token for <@{w.bob.id}>")
    assert sb.wait_for_message  # the channel post with the bot token is unaffected by the token TTL


async def test_token_ttl_setting(running: Running) -> None:
    sb, w = running.sb, running.world
    sb.settings.token_ttl = 0.0
    try:
        inter = await sb.slash(w.alice, w.studio, "echo", {"text": "ttl"})
    finally:
        sb.settings.token_ttl = 15 * 60.0
    await inter.wait_response()
    url = f"{sb.api_base}/webhooks/{sb.application_id}/{inter.token}/messages/@original"
    async with aiohttp_session() as http, http.get(url) as r:
        assert r.status == 401 and (await r.json())["code"] == 50027


async def test_dm_slash_and_bot_dm(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    dm = sb.dm_channel(w.alice)
    inter = await sb.slash(w.alice, dm, "dm")
    assert (await inter.wait_response()).content == "in dm"
    assert "user" in inter.payload and "member" not in inter.payload and inter.payload["context"] == 1
    await rec.wait_flag("dm")
    hello = await sb.wait_for_message(lambda m: m.content == "hello in your DMs")
    assert hello.channel_id == dm.id and hello.guild_id is None


async def test_discord_limits_surface_as_http_errors(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    for kind, code in (("content", 50035), ("custom_id", 50035), ("followup", 50035)):
        rec.error_seen.clear()
        inter = await sb.slash(w.alice, w.studio, "limits", {"kind": kind})
        await asyncio.wait_for(rec.error_seen.wait(), 3)
        exc = rec.errors[-1]
        assert isinstance(exc, discord.HTTPException) and exc.code == code, (kind, exc)
        await inter.wait_response()
    assert "Must be 2000 or fewer in length" in str(exc)
    fine = await sb.slash(w.alice, w.studio, "limits", {"kind": "rows"})
    # After a defer, Discord turns the first follow-up into the (previously loading) original.
    msg = await fine.wait_original(lambda m: not m.loading)
    assert fine.followups == [] and msg.content == "25 buttons is fine"
    assert len(msg.components) == 5 and len(msg.buttons) == 25


async def test_rate_limit_429_is_waited_out(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    cb = sb.inject_fault("POST", r"/interactions/\d+/.+/callback", status=429, retry_after=0.05)
    post = sb.inject_fault("POST", r"^/channels/\d+/messages$", status=429, retry_after=0.05, count=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "limited"})
    first = await inter.wait_response(3)
    assert first.content == "limited" and cb.hits == 1
    assert inter.response_latency < 1.0  # one 50 ms retry, not a second-long backoff
    rec.done.pop("post", None)
    await sb.slash(w.alice, w.studio, "post")
    await rec.wait_flag("post")
    assert post.hits == 2 and loop.time() - started < 2.0
    statuses = [r.status for r in sb.requests if r.method == "POST" and r.path.endswith("/messages")]
    assert statuses[-4:] == [429, 429, 200, 200]  # send (after two 429s), then the reply


async def test_server_error_is_retried(running: Running) -> None:
    sb, w, rec = running.sb, running.world, running.rec
    rule = sb.inject_fault("POST", r"^/channels/\d+/messages$", status=500)
    rec.done.pop("post", None)
    await sb.slash(w.alice, w.studio, "post")
    await rec.wait_flag("post", timeout=5)  # discord.py sleeps 1 s before retrying a 500
    assert rule.hits == 1


async def test_gateway_drop_resumes_and_replays(running: Running) -> None:
    sb, w, bot = running.sb, running.world, running.bot
    resumed_before = sb.gateway.resume_count
    await sb.drop_gateway(4000)
    # Dispatched while the bot may still be disconnected: kept in the session and replayed.
    inter = await sb.slash(w.alice, w.studio, "echo", {"text": "after drop"})
    await sb.wait_resumed(resumed_before + 1)
    assert (await inter.wait_response(5)).content == "after drop"
    assert sb.gateway.identify_count == 1  # resumed, not re-identified
    assert sb.gateway.connect_paths[-1] == "/gateway/resume"  # used resume_gateway_url
    await sb.drop_gateway(abrupt=True)
    await sb.wait_resumed(resumed_before + 2)
    again = await sb.slash(w.bob, w.studio, "echo", {"text": "still here"})
    assert (await again.wait_response(5)).content == "still here"
    assert bot.recorder.resumed >= 2


async def test_transcript_renders_the_channel(running: Running, tmp_path) -> None:
    sb, w = running.sb, running.world
    index = write_transcript(sb, [w.studio, sb.dm_channel(w.alice)], tmp_path)
    page = index.read_text()
    assert index.name == "index.html"
    for text in ("hi hi", "count 2 by alice", "Only you can see this", "album edited", "hello in your DMs"):
        assert text in page
    assert "class='btn primary'" in page and "🎲" in page and "#</span>studio</h2>" in page
    assert "used <b>/echo</b>" in page
    images = [p for p in tmp_path.iterdir() if p.suffix == ".png"]
    assert any(p.name.endswith("three.png") for p in images)
    assert all(f"src='{p.name}'" in page or f"href='{p.name}'" in page for p in images)


def aiohttp_session():
    import aiohttp

    return aiohttp.ClientSession()
