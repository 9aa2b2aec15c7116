"""scripts/gpu-bench on the CPU: the same code a GPU run uses, on the tiny model at 256², 2 steps.

Not marked `bench`: `make test` runs it, so the script a short GPU lease depends on is known to
work before anyone spends the lease on it. It runs the script as an operator would (its own
process: the bench patches torch.compile and loads models, none of which may leak into the
other tests) and checks the JSON has every section with sane figures, and the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-bench"
SECTIONS = ("build", "text2img fp32", "batch", "client", "switch", "upscale", "controlnet", "lora", "compile")
# Sections that skip (rather than fail) when their optional module is missing.
OPTIONAL = {"lora": "peft"}


def _spandrel_usable() -> bool:
    try:
        import spandrel  # noqa: F401  (imports torchvision, which may not load beside this torch)
    except Exception:
        return False
    return True


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_gpu_bench_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    started = time.perf_counter()
    proc = _run("--device", "cpu", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work"))
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())

    assert data["profile"]["device"] == "cpu" and data["profile"]["model"] == "tiny"
    assert data["profile"]["size"] == 256 and data["profile"]["steps"] == 2
    assert data["machine"]["torch"]
    sections = data["sections"]
    for name in SECTIONS:
        assert name in sections, f"section {name!r} missing from the JSON"
        section = sections[name]
        module = OPTIONAL.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            assert section["status"] == "skipped", section
            continue
        assert section["status"] == "ok", (name, section["reason"])
        assert section["rows"], f"section {name!r} has no figures"
        for row in section["rows"]:
            for key in ("bare", "runner", "client", "value"):
                if row[key] is None:
                    continue
                # A share may round to 0 on a loaded 2-core machine (the refiner's 20 % of 2 steps
                # is within the noise of the decode it is measured against); a time may not.
                if key == "value" and str(row["unit"]).startswith("%"):
                    assert 0 <= row[key] <= 100, (name, row)
                else:
                    assert row[key] > 0, (name, row)

    def row(section: str, figure_start: str) -> dict:
        return next(r for r in sections[section]["rows"] if r["figure"].startswith(figure_start))

    main = row("text2img fp32", "text2img 256²")
    assert main["bare"] > 0 and main["runner"] > 0 and main["runner_speed_vs_bare"] > 0
    assert row("text2img fp32", "base / refiner / decode split")["unit"] == "% refiner"
    assert row("client", "text2img")["client"] > 0
    assert row("switch", "switch models")["value"] > 0
    assert row("compile", "compile warm-up")["runner_speed_vs_bare"] is None  # one-off: no ratio
    upscale = next(name for name in sections if name.startswith("upscale"))
    if _spandrel_usable():  # `make test-upscalers`: the ESRGAN pre-pass is timed beside Lanczos
        assert row(upscale, "upscale job, ESRGAN + img2img")["runner"] > 0
        assert row(upscale, "ESRGAN ×4 pass alone")["runner"] > 0

    table = proc.stdout
    assert "| section | figure | bare diffusers | engine Runner | engine client |" in table
    for name in SECTIONS:
        assert f"\n| {name}" in table, f"section {name!r} missing from the table"  # rows say "batch fp32" …
    print(f"\ngpu-bench on the CPU: {seconds:.1f} s wall, {data['total_seconds']:.1f} s inside the script")


def test_dependency_list_and_wheel_specs() -> None:
    specs = _run("--wheel-specs", timeout=60)
    assert specs.returncode == 0, specs.stderr
    wanted = dict(line.split("==") for line in specs.stdout.split())
    assert {"diffusers", "compel", "pydantic", "pydantic-core", "pydantic-settings"} <= set(wanted)
    # The project's own pins (constraints.txt) are the ones carried to the GPU machine.
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name, version in wanted.items():
        if name in pins:
            assert pins[name] == version, f"{name}: gpu-bench carries {version}, constraints.txt pins {pins[name]}"
    check = _run("--check-deps", timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr  # everything needed is installed here
    assert "diffusers" in check.stdout and "missing" not in check.stdout.split("spandrel")[0]


# Project dependencies whose import name is not their distribution's name.
IMPORT_NAMES = {"pillow": "PIL", "google-re2": "re2", "opencv-python-headless": "cv2", "discord.py": "discord"}
IMPORTED = """
import importlib, pkgutil, sys
sys.path.insert(0, "scripts")
import engine, gpubench.cli, gpubench.extras, gpubench.harness, gpubench.sections
for info in pkgutil.walk_packages(engine.__path__, "engine."):
    if not info.name.startswith(("engine.ray", "engine.tiny_esrgan")):  # not on the bench's path
        importlib.import_module(info.name)
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_every_dependency_the_engine_imports_is_on_the_gpu_machine_or_carried() -> None:
    """A package the engine imports but the GPU machine lacks would end a lease at its first
    import: each must be the machine's own (deps.PROVIDED) or carried (deps.WHEELS)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpubench import deps
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    proc = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = set(proc.stdout.split())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    covered = {module for _, module in deps.PROVIDED} | {w.module for w in deps.WHEELS}
    covered |= {module for _, module, _ in deps.OPTIONAL_PROVIDED}
    for requirement in project:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if module in imported:
            assert module in covered, f"the engine imports {module} ({name}): add it to scripts/gpubench/deps.py"
