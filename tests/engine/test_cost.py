"""Compute units: 1.0 = one 1024² image at 30 steps; pixels × steps actually run × images."""

from __future__ import annotations

import pytest

from engine.jobs import Refine, Text2Img, Upscale, Variations, img2img_steps


def test_reference_job_costs_one_unit() -> None:
    assert Text2Img(job_id="a", prompt="p").cost() == 1.0


def test_text2img_scales_with_pixels_steps_and_count() -> None:
    base = Text2Img(job_id="a", prompt="p", width=512, height=512, steps=30).cost()
    assert base == pytest.approx(0.25)
    assert Text2Img(job_id="a", prompt="p", width=512, height=512, steps=60).cost() == pytest.approx(0.5)
    assert Text2Img(job_id="a", prompt="p", width=512, height=512, count=4).cost() == pytest.approx(1.0)


def test_img2img_pays_only_the_steps_it_runs() -> None:
    assert img2img_steps(30, 0.3) == 9
    assert img2img_steps(4, 0.05) == 1  # never zero: diffusers runs at least one step
    refine = Refine(job_id="a", image=b"", strength=0.3)
    assert refine.cost((1024, 1024)) == pytest.approx(9 / 30)
    variations = Variations(job_id="a", image=b"", strength=0.6, count=4)
    assert variations.cost((1024, 1024)) == pytest.approx(18 / 30 * 4)


def test_upscale_is_priced_by_output_pixels() -> None:
    job = Upscale(job_id="a", image=b"", strength=0.3, steps=20)
    assert job.cost((512, 512)) == pytest.approx(1.0 * 6 / 30)


def test_image_jobs_need_their_size() -> None:
    with pytest.raises(ValueError, match="input_size"):
        Refine(job_id="a", image=b"").cost()
