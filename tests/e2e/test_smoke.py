"""The shortest path through everything: /generate → queue card → progress → result with buttons."""

from __future__ import annotations

import itertools

import pytest

from studio.harness import Studio, job_id_of
from tests.e2e.member_kit import EDITING_BUTTONS

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


async def test_generate_posts_a_result_with_the_contract_buttons(studio: Studio) -> None:
    member = studio.new_member("smoke")
    inter = await studio.command(member, "generate", {"prompt": "a red fox in snow", "seed": 7})
    card = inter.response
    assert card is not None and not card.ephemeral
    assert card.content.startswith("Queued")
    job_id = job_id_of(inter)
    assert f"Job `{job_id}`" in card.content and "Cost 0.01 units" in card.content  # 256² × 4 steps
    assert inter.response_latency is not None and inter.response_latency < 3.0

    result = await studio.result_of(job_id)
    assert len(result.attachments) == 1
    labels = [c["label"] for row in result.components for c in row["components"]]
    assert labels == ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING_BUTTONS]
    embed = result.embeds[0]
    assert embed["description"] == "a red fox in snow"
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Seed"] == "7" and fields["Job"] == job_id and fields["Size"] == "256×256"
    assert fields["Model"] == "tiny" and fields["Steps"] == "4"

    status = await studio.status_text(job_id, "Done")
    assert result.jump_url if hasattr(result, "jump_url") else True
    assert status.components == []  # the Cancel button is gone once done


async def test_progress_is_edited_at_most_every_two_seconds_with_a_preview(studio: Studio) -> None:
    member = studio.new_member("patient")
    # Long enough (4 images × 60 steps: several seconds) that several progress edits are due.
    inter = await studio.command(
        member, "generate", {"prompt": "a long exposure", "steps": 60, "aspect": "16:9", "count": 4}
    )
    job_id = job_id_of(inter)
    await studio.result_of(job_id)
    status = await studio.status_text(job_id, "Done")
    versions = [*status.history]
    running = [v for v in versions if v.content.startswith("Running")]
    assert running, [v.content for v in versions]
    assert any("step " in v.content and "/60" in v.content for v in running)
    assert any(v.attachments for v in running), "no preview image was shown"
    edit_times = [v.at for v in versions[1:]] + [status.edited_at]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(edit_times)]
    # The final edit (Done) is not throttled; every progress edit is ≥ 2 s after the previous.
    assert all(gap >= 1.95 for gap in gaps[:-1]), gaps
