"""`atelier demo` exactly as a user runs it: the console script, in a fresh working directory, as
a subprocess. Then the HTML transcript it wrote, and a screenshot of that page taken with headless
Chromium and read back with OCR, so what a person sees is checked, not only the markup.

Chromium and tesseract come from Debian (`scripts/system-deps.sh` installs them as root); without
them the screenshot tests skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.member_kit import EDITING_BUTTONS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

DEMO_TIMEOUT = 900  # s; ~50-100 s alone on 2 cores, more while other suites run
SCREEN_WIDTH = 1280
SCREEN_HEIGHT = 16000  # tall enough for the whole page (~7000 px); checked below
DISCORD_BG = (0x31, 0x33, 0x38)

SINGLE_BUTTONS = ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING_BUTTONS]
GRID_BUTTONS = ["U1", "U2", "U3", "U4", "V1", "V2", "V3", "V4", "Reroll", "Delete"]
# Steps whose result also shows a control map (an attachment drawn as the embed's thumbnail).
CONTROL_MAPS = {"alice /generate following a sketch (control)"}
STEP_LINE = re.compile(r"^\s+(?P<what>.+?)\s{2,}(?P<outcome>.+?)\s+\((?P<seconds>[\d.]+) s\)$")
POSTED = re.compile(r"posted (\d+) image\(s\), job ([0-9A-Z]{8})")
SUMMARY = re.compile(r"^demo finished in [\d.]+ s: (\d+) steps, (\d+) image files$", re.M)
# The scripted session (studio/demo.py): what each step posts.
EXPECTED_STEPS = [
    ("alice /generate", 1),
    ("alice clicks Reroll", 1),
    ("alice clicks Upscale", 1),
    ("bob /generate count:4", 4),
    ("bob clicks V2", 4),
    ("alice clicks Variations", 4),
    ("alice /refine with an uploaded image", 1),
    ("alice /generate following a sketch (control)", 2),  # the picture and its edge map (CONTROL_MAPS)
    ("bob clicks Vary Region, picks the centre", 1),
    ("alice clicks Zoom Out", 1),
    ("alice clicks Pan Right", 1),
    ("alice /generate with a LoRA", 1),
    ("alice /generate draft:true", 1),
    ("mia (moderator) /mod quota set bob 0.5", 0),
    ("bob /generate count:4 again", 0),
]


def atelier_script() -> Path:
    """The venv's console script, next to the interpreter running the tests."""
    return Path(sys.executable).parent / "atelier"


@dataclass
class DemoRun:
    workdir: Path
    out: Path
    returncode: int
    stdout: str
    stderr: str
    steps: dict[str, str] = field(default_factory=dict)  # what -> outcome
    jobs: dict[str, tuple[str, int]] = field(default_factory=dict)  # what -> (job id, images)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    script = atelier_script()
    if not script.exists():
        pytest.fail(f"no console script {script}: install the project (make install)")
    workdir = tmp_path_factory.mktemp("demo-cwd")
    out = workdir / "demo-out"
    # A user's shell: nothing of the test session's configuration leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "PYTEST_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [str(script), "demo", "--out", str(out)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )
    run = DemoRun(workdir, out, done.returncode, done.stdout, done.stderr)
    for line in done.stdout.splitlines():
        match = STEP_LINE.match(line)
        if match:
            run.steps[match["what"]] = match["outcome"]
            posted = POSTED.search(match["outcome"])
            if posted:
                run.jobs[match["what"]] = (posted[2], int(posted[1]))
    return run


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------- the run and its summary
def test_demo_exits_0_and_prints_the_summary(demo: DemoRun) -> None:
    assert demo.returncode == 0, f"stdout:\n{_tail(demo.stdout)}\nstderr:\n{_tail(demo.stderr)}"
    assert "Traceback" not in demo.stdout + demo.stderr, _tail(demo.stderr, 80)
    assert "playing the scripted session:" in demo.stdout
    assert list(demo.steps) == [what for what, _ in EXPECTED_STEPS], demo.stdout
    for what, images in EXPECTED_STEPS:
        if images:
            assert demo.jobs[what][1] == images, (what, demo.steps[what])
    assert len({job for job, _ in demo.jobs.values()}) == len(demo.jobs)  # every accepted step is its own job
    assert demo.steps["mia (moderator) /mod quota set bob 0.5"].startswith("moderator sees: @bob may now use 0.50")
    refusal = demo.steps["bob /generate count:4 again"]
    assert refusal.startswith("refused (ephemeral): Not enough quota"), refusal
    summary = SUMMARY.search(demo.stdout)
    assert summary is not None, demo.stdout
    assert int(summary[1]) == len(EXPECTED_STEPS)
    assert int(summary[2]) == sum(n for _, n in EXPECTED_STEPS)
    assert f"transcript: {demo.out / 'index.html'}" in demo.stdout or "transcript: demo-out" in demo.stdout
    # Built where a user's `make demo` builds it: ./data/tiny-sdxl in the working directory.
    assert (demo.workdir / "data" / "tiny-sdxl" / "base" / "model_index.json").exists()


def test_every_posted_image_is_on_disk(demo: DemoRun) -> None:
    assert demo.returncode == 0
    files = sorted(p for p in demo.out.iterdir() if p.suffix.lower() in (".png", ".webp", ".jpg"))
    assert len(files) == sum(n for _, n in EXPECTED_STEPS)
    for what, (job, count) in demo.jobs.items():
        mine = [p for p in files if f"-{job}-" in p.name]
        assert len(mine) == count, (what, job, [p.name for p in files])
    for path in files:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert min(image.size) >= 256 and image.size[0] % 64 == 0 and image.size[1] % 64 == 0, path
    page = (demo.out / "index.html").read_text(encoding="utf-8")
    sources = set(re.findall(r"<img[^>]* src='([^']+)'", page))
    assert sources == {p.name for p in files}  # each shown once, nothing missing, nothing extra


# ---------------------------------------------------------------------- the HTML transcript
@dataclass
class Shown:
    """One message of the transcript as a reader sees it."""

    text: str = ""
    first_version: str = ""  # of an edited message
    buttons: list[str] = field(default_factory=list)
    images: int = 0
    ephemeral: bool = False


class _TranscriptReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.messages: list[Shown] = []
        self._depth = 0  # open divs inside the current message
        self._current: Shown | None = None
        self._in: list[str] = []  # stack of the classes of the open divs/spans
        self._button: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and "msg" in classes and self._current is None:
            self._current = Shown(ephemeral="ephemeral" in classes)
            self._depth = 0
            self._in = []
        if self._current is None:
            return
        if tag in ("div", "span"):
            self._in.append(" ".join(classes))
            self._depth += tag == "div"
        if tag == "span" and "btn" in classes:
            self._button = []
        if tag == "img" and not any("avatar" in c for c in self._in):
            self._current.images += 1

    def handle_endtag(self, tag: str) -> None:
        if self._current is None or tag not in ("div", "span"):
            return
        closed = self._in.pop() if self._in else ""
        if tag == "span" and closed.startswith("btn") and self._button is not None:
            # the label is the last text (the emoji comes first, in its own span)
            self._current.buttons.append(self._button[-1].strip() if self._button else "")
            self._button = None
        if tag == "div":
            self._depth -= 1
            if self._depth == 0:
                self._current.text = " ".join(self._current.text.split())
                self._current.first_version = " ".join(self._current.first_version.split())
                self.messages.append(self._current)
                self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is None:
            return
        if self._button is not None and data.strip():
            self._button.append(data)
        self._current.text += data + " "
        if "was" in self._in and "time" not in self._in:  # the version, not its "first posted" time
            self._current.first_version += data + " "


def read_transcript(path: Path) -> list[Shown]:
    reader = _TranscriptReader()
    reader.feed(path.read_text(encoding="utf-8"))
    return reader.messages


def test_transcript_shows_the_session(demo: DemoRun) -> None:
    assert demo.returncode == 0
    messages = read_transcript(demo.out / "index.html")
    jobs = {job: count for job, count in demo.jobs.values()}
    maps = {demo.jobs[what][0] for what in CONTROL_MAPS}
    for job, count in jobs.items():
        # The queue card: first posted as `Queued … Job <id> · Cost <x> units`, then edited to Done.
        cards = [m for m in messages if m.first_version.startswith("Queued") and f"Job {job}" in m.first_version]
        assert len(cards) == 1, (job, [m.first_version for m in messages if m.first_version])
        assert re.search(r"Cost \d+\.\d\d units", cards[0].first_version)
        assert not cards[0].ephemeral and f"Done · Job {job}" in cards[0].text
        # The result: an embed naming the job, its images, the contract's buttons.
        results = [m for m in messages if m.buttons and f"Job {job}" in m.text and m.images]
        assert len(results) == 1, job
        result = results[0]
        assert result.images == count
        pictures = count - (job in maps)  # a control map is shown, but it gets no button
        assert result.buttons == (SINGLE_BUTTONS if pictures == 1 else GRID_BUTTONS), (job, result.buttons)
        assert (job in maps) == ("Control edges" in result.text), job
        assert "Seed" in result.text and "Model tiny" in result.text and "Sampler" in result.text
    first = next(m for m in messages if m.images and "Job " + demo.jobs["alice /generate"][0] in m.text)
    assert "a lighthouse on a cliff at dusk, oil painting" in first.text and "Seed 1234" in first.text
    assert "<@" not in " ".join(m.text for m in messages)  # mentions are drawn as @name, never raw

    mod = [m for m in messages if "may now use 0.50 units per window" in m.text]
    assert len(mod) == 1 and mod[0].ephemeral and "Only you can see this (mia)" in mod[0].text
    assert "@bob" in mod[0].text
    refusal = [m for m in messages if "Not enough quota" in m.text]
    assert len(refusal) == 1 and refusal[0].ephemeral, refusal
    assert "Only you can see this (bob)" in refusal[0].text and "bob used /generate" in refusal[0].text
    assert not any(m.first_version.startswith("Queued") for m in refusal)  # nothing was queued
    picker = [m for m in messages if "Which parts should be redone?" in m.text]
    assert len(picker) == 1 and picker[0].ephemeral and "Only you can see this (bob)" in picker[0].text
    assert sum(m.ephemeral for m in messages) == 3  # the refusal, the moderator's answer, the region picker


# ---------------------------------------------------------------------- the page as a person sees it
@pytest.fixture(scope="module")
def screenshot(demo: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Image.Image:
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if chromium is None:
        pytest.skip("no chromium (Debian package `chromium`; scripts/system-deps.sh installs it as root)")
    if demo.returncode != 0:
        pytest.fail("the demo failed: no transcript to look at")
    shots = tmp_path_factory.mktemp("screenshot")
    png = shots / "transcript.png"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                f"--window-size={SCREEN_WIDTH},{SCREEN_HEIGHT}",
                (demo.out / "index.html").resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert png.exists(), f"chromium wrote no screenshot (exit {done.returncode}):\n{_tail(done.stderr)}"
    image = Image.open(png).convert("RGB")
    # Crop the empty page below the last message.
    pixels = np.asarray(image).astype(np.int16)
    busy = np.flatnonzero((np.abs(pixels - np.array(DISCORD_BG)).sum(axis=2) > 24).any(axis=1))
    assert busy.size, "blank screenshot"
    bottom = int(busy.max()) + 16
    assert bottom < SCREEN_HEIGHT - 16, "the page is taller than the screenshot: raise SCREEN_HEIGHT"
    image = image.crop((0, 0, SCREEN_WIDTH, bottom))
    image.save(shots / "transcript-cropped.png")
    return image


PICTURE_TILE = 16


def picture_tiles(image: Image.Image) -> np.ndarray:
    """Which 16×16 tiles of the page belong to a picture. A tile of a picture (the tiny model's
    noise, even smoothed by an upscale) holds 100-250 distinct colours; text and buttons stay under
    50 (anti-aliasing only blends two colours), an emoji's few tiles under 120."""
    block = PICTURE_TILE
    rgb = np.asarray(image.convert("RGB")) >> 3  # 32 levels per channel
    code = (rgb[..., 0].astype(np.int32) << 10) | (rgb[..., 1].astype(np.int32) << 5) | rgb[..., 2]
    rows, cols = code.shape[0] // block, code.shape[1] // block
    tiles = code[: rows * block, : cols * block].reshape(rows, block, cols, block).transpose(0, 2, 1, 3)
    tiles = np.sort(tiles.reshape(rows, cols, block * block), axis=2)
    return 1 + (np.diff(tiles, axis=2) != 0).sum(axis=2) > 80


def picture_regions(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (left, top, right, bottom in px) of the separate pictures on the page:
    touching picture tiles form one region; specks under ~128×128 px are ignored."""
    busy = picture_tiles(image)
    rows, cols = busy.shape
    seen = np.zeros_like(busy)
    regions = []
    for r, c in zip(*np.nonzero(busy), strict=True):
        if seen[r, c]:
            continue
        stack, cells = [(r, c)], []
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            cells.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < rows and 0 <= nx < cols and busy[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(cells) >= 64:
            ys, xs = [y for y, _ in cells], [x for _, x in cells]
            t = PICTURE_TILE
            regions.append((int(min(xs)) * t, int(min(ys)) * t, (int(max(xs)) + 1) * t, (int(max(ys)) + 1) * t))
    return regions


def test_screenshot_is_a_real_render(screenshot: Image.Image) -> None:
    width, height = screenshot.size
    assert width == SCREEN_WIDTH and height > 3000, screenshot.size  # 9 steps, 16 images
    pixels = np.asarray(screenshot).astype(np.int16)
    background = (np.abs(pixels - np.array(DISCORD_BG)).sum(axis=2) <= 6).mean()
    assert background > 0.4, f"only {background:.0%} of the page has Discord's dark background"
    assert screenshot.convert("L").getextrema()[1] > 200, "no light text on the page"
    # 16 images: 3 single results, a 4-image grid, two variation grids, a refine (each grid may
    # merge into one region), so at least 7 separate picture areas.
    assert len(picture_regions(screenshot)) >= 7, picture_regions(screenshot)


def ocr_text(image: Image.Image, workdir: Path) -> str:
    """Tesseract's reading of the page. Discord's text is white or grey on dark grey, blurple, red
    or green: the smallest of R, G, B is high only for text, so that channel, inverted, gives
    dark text on a light page whatever the background. Pictures are blanked out; the page is enlarged
    2× (the small print is 12-13 px) and cut into bands so each call stays small."""
    channels = np.asarray(image.convert("RGB")).min(axis=2)
    lowest = Image.fromarray(channels)
    background = int(np.bincount(channels.ravel()).argmax())
    for box in picture_regions(image):  # pictures only confuse the page layout analysis
        lowest.paste(background, box)
    lowest = lowest.resize((lowest.width * 2, lowest.height * 2), Image.Resampling.LANCZOS)
    page = lowest.point(lambda v: 255 - v)  # inverted, not thresholded: thin grey print survives
    texts = []
    band = 3000
    for i, top in enumerate(range(0, page.height, band)):
        path = workdir / f"band{i}.png"
        page.crop((0, top, page.width, min(page.height, top + band + 60))).save(path)
        done = subprocess.run(
            ["tesseract", str(path), "stdout", "--psm", "3", "-l", "eng"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        texts.append(done.stdout)
    return "\n".join(texts)


def test_screenshot_reads_like_the_session(screenshot: Image.Image, tmp_path: Path, demo: DemoRun) -> None:
    if shutil.which("tesseract") is None:
        pytest.skip("no tesseract (Debian package `tesseract-ocr`; scripts/system-deps.sh installs it as root)")
    text = ocr_text(screenshot, tmp_path)
    flat = " ".join(text.split())
    (tmp_path / "ocr.txt").write_text(text, encoding="utf-8")
    expected = [
        "Queued",
        "Done",
        "a lighthouse on a cliff at dusk",
        "four tiny robots having tea",
        "Reroll",
        "Upscale",
        "Variations",
        "Refine",
        "Delete",
        "may now use 0.50 units per window",
        "Not enough quota",
        "Only you can see this",
        "used /generate",
    ]
    missing = [word for word in expected if word.lower() not in flat.lower()]
    assert not missing, f"not read on the screenshot: {missing}\nOCR text:\n{text[:3000]}"
    # One queue card and one result per job (7): OCR may misread one.
    assert flat.count("Queued") >= 6 and flat.count("Reroll") >= 6, (flat.count("Queued"), flat.count("Reroll"))
    # U1-U4 / V1-V4 in small print: tesseract reads "U1" as "Ul" at times; allow that and a miss
    grid_labels = {m.upper().replace("L", "1").replace("I", "1") for m in re.findall(r"\b[UuVv][1-4lI]\b", flat)}
    assert len(grid_labels) >= 6, grid_labels
    job = demo.jobs["alice /generate"][0]
    assert job.replace("O", "0") in flat.upper().replace("O", "0"), job  # the ids' 0/O look alike
