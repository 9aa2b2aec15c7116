"""Where a job's images come from again: a finished job's results and the control map it
followed (from disk, or from Discord once pruned), and a member's upload fetched again from
Discord, each checked and fitted like a new input (engine.validate, off the event loop). Buttons
(Variations, Vary Region, Upscale, Reroll…) start jobs from these; bot.intake admits them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import discord

from bot.errors import Refused
from bot.storage import OutputStore, control_entry, result_images
from config.settings import Settings
from db.jobs import JobRecord, JobStore
from engine import validate
from engine.jobs import JobOrder, load_order
from engine.jobs.controlled import CONTROL_FIELDS

log = logging.getLogger(__name__)

# Seconds to download a member's upload or a pruned result again from Discord.
FETCH_SECONDS = 2.0


class StoredInputs:
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        outputs: OutputStore,
        fetch: Callable[[str], Any],
        decoding: asyncio.Semaphore,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.outputs = outputs
        self._fetch = fetch  # downloads a Discord CDN URL with the bot's own HTTP client
        self._decoding = decoding  # the intake's bound on decodes at once

    async def control_again(self, order: JobOrder, record: JobRecord) -> bytes:
        """A ControlNet job's control image for its Reroll, fetched again where it was uploaded
        (inputs are not kept; a Reroll's order keeps the original's URL). A job made from a
        controlled result followed that result's map as is, and posted it with its own result:
        that map again."""
        if order.control_url:
            try:
                return bytes(await asyncio.wait_for(self._fetch(order.control_url), FETCH_SECONDS))
            except (TimeoutError, discord.HTTPException):
                pass
        elif (entry := control_entry(record.images)) is not None and (data := await self.stored(entry)) is not None:
            return data
        raise Refused(
            f"The control image of job `{order.spec.job_id}` is no longer available: run /generate again with it."
        )

    async def input_again(self, record: JobRecord) -> bytes:
        """The image a finished image job started from: the image of the job it was made from (a
        button; a Reroll's is its parent's), or the member's attachment on Discord (a command)."""
        for _ in range(32):  # a chain of rerolls ends at a button or a command
            order = load_order(record.kind, record.params, job_id=record.id)
            if order.parent is None:
                break
            parent = await self.parent(order.parent.job)
            if order.parent.action != "reroll":
                return await self.parent_image(parent, order.parent.index or 0)
            record = parent
        if order.input_url:
            try:
                return bytes(await asyncio.wait_for(self._fetch(order.input_url), FETCH_SECONDS))
            except (TimeoutError, discord.HTTPException):
                pass
        raise Refused(
            f"The image job `{record.id}` started from is no longer available: run the command again with the image."
        )

    async def parent(self, job_id: str) -> JobRecord:
        record = await self.jobs.get(job_id)
        if record is None:
            raise Refused(f"Job `{job_id}` no longer exists.")
        return record

    async def parent_image(self, parent: JobRecord, index: int) -> bytes:
        images = result_images(parent.images)
        if parent.status != "done" or index >= len(images):
            raise Refused(f"Job `{parent.id}` has no image {index + 1}.")
        data = await self.stored(images[index])
        if data is None:
            raise Refused(f"The image of job `{parent.id}` is no longer available.")
        return data

    async def parent_control(self, parent: JobRecord, spec: Any, *, keep_resolution: bool = False) -> dict[str, Any]:
        """The ControlNet fields of a job made from a controlled result: the parent's mode,
        strength and guidance, and the control map it followed (stored with its result), given as
        is, so no estimator runs again. None when the parent had no control, its mode is no longer
        set up, or its map is gone: the job then runs without (and says so in the log)."""
        mode = getattr(spec, "control", "")
        if not mode:
            return {}
        entry = control_entry(parent.images)
        data = await self.stored(entry) if entry is not None and mode in self.settings.control_modes else None
        if data is None:
            log.info("job=%s control (%s) not carried: the mode or the map is gone", parent.id, mode)
            return {}
        async with self._decoding:
            png, _ = await self.prepare(data, upscale=False, keep_resolution=keep_resolution)  # as the image
        return {name: getattr(spec, name) for name in CONTROL_FIELDS} | {"control_as_is": True, "control_image": png}

    async def stored(self, entry: dict[str, Any]) -> bytes | None:
        """A stored result image (or control map): from disk, or from Discord once pruned."""
        data = None
        if entry.get("path"):
            data = await asyncio.to_thread(self.outputs.read, entry["path"])
        if data is None and entry.get("url"):
            # The file was pruned: the image is still on Discord.
            try:
                data = await asyncio.wait_for(self._fetch(entry["url"]), FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                data = None
        return None if data is None else bytes(data)

    async def prepare(
        self, data: bytes, *, upscale: bool, keep_resolution: bool = False
    ) -> tuple[bytes, tuple[int, int]]:
        gen = self.settings.generation
        return await asyncio.to_thread(
            validate.prepare_input_image,
            data,
            max_bytes=gen.max_attachment_bytes,
            max_pixels=gen.max_attachment_pixels,
            upscale_factor=2 if upscale else None,
            upscale_max_side=gen.upscale_max_side,
            keep_resolution=keep_resolution,
        )


__all__ = ["FETCH_SECONDS", "StoredInputs"]
