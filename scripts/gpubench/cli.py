"""`scripts/gpu-bench`: arguments, the dependency check, and the order of the run.

Order (each section is timed, budgeted and written to the JSON as soon as it ends):

    build        the model: the full-size random SDXL on a GPU (engine.fullsize), the tiny one on a CPU
    text2img …   per dtype: load, warm-up, ensemble and base alone on both sides, decode, memory
    batch        count 2 and 4 (main dtype)
    client       the LocalEngineClient end to end
    switch       two models, LRU in CPU RAM → device
    upscale      img2img upscale, with an ESRGAN pre-pass when spandrel imports
    controlnet   when diffusers has it
    lora         when peft is installed (with the ControlNet: everything loaded at once)
    compile      engine.accel.compile_unet on both UNets, then the same jobs (always last)

Nothing heavy is imported before the dependency check, so `--check-deps` and `--wheel-specs` run
on a machine with nothing but Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import deps

SECTIONS = ("build", "text2img", "batch", "client", "switch", "upscale", "controlnet", "lora", "compile")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu-bench",
        description="Atelier's engine against bare diffusers, side by side, on a random-weight SDXL "
        "(full size on a GPU: 1024², 30 steps; the tiny model on a CPU: 256², 2 steps).",
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--model", choices=("auto", "full", "tiny"), default="auto", help="auto: full on CUDA, tiny on CPU")
    p.add_argument("--model-dir", type=Path, help="use this folder's base/ and refiner/ instead of building one")
    p.add_argument("--workdir", type=Path, help="where the model and fixtures go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (the built model) at the end")
    p.add_argument("--out", type=Path, default=Path("gpu-bench.json"), help="the JSON report (written per section)")
    p.add_argument("--quick", action="store_true", help="one repetition per figure")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 2; 1 with --quick)")
    p.add_argument("--size", type=int, help="image side in px (default 1024 on a GPU, 256 on a CPU)")
    p.add_argument("--steps", type=int, help="steps (default 30 on a GPU, 2 on a CPU)")
    p.add_argument("--dtypes", help="comma-separated, the last is the main one (default fp16,bf16 on a GPU)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 470 on a GPU, 300 on a CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the compile section")
    p.add_argument("--only", help=f"comma-separated sections to run (of {', '.join(SECTIONS)})")
    p.add_argument("--skip", help="comma-separated sections not to run")
    p.add_argument("--check-deps", action="store_true", help="list the packages needed, installed or not, and exit")
    p.add_argument("--wheel-specs", action="store_true", help="print NAME==VERSION of the wheels to carry, and exit")
    return p


def say(message: str) -> None:
    print(f"[gpu-bench] {message}", file=sys.stderr, flush=True)


def _names(text: str | None) -> set[str]:
    names = {part.strip() for part in (text or "").split(",") if part.strip()}
    unknown = names - set(SECTIONS)
    if unknown:
        raise SystemExit(f"gpu-bench: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    return names


def quiet_libraries() -> None:
    """Keep the output to the bench's own lines: no hub, no progress bars, no deprecation noise."""
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # The libraries' own loggers, in this process and (through the environment) in the engine worker.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")  # three LoRAs on purpose
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")  # random weights
    for name in ("diffusers", "transformers", "engine", "atelier", "accelerate", "peft", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_profile(args: argparse.Namespace) -> Any:
    import dataclasses

    import torch

    from .harness import cpu_profile, gpu_profile

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-bench: --device cuda but CUDA is not available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    profile = (gpu_profile if cuda else cpu_profile)(device, args.quick)
    changes: dict[str, Any] = {}
    if args.model != "auto":
        changes["model"] = args.model
    if args.reps:
        changes["reps"] = args.reps
    for name in ("size", "steps", "budget"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    if args.dtypes:
        changes["dtypes"] = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if args.no_compile:
        changes["compile"] = False
    return dataclasses.replace(profile, **changes)


def run_section(report: Any, name: str, fn: Callable[[Any], None], *, allowed: bool = True, why: str = "") -> None:
    """Run one section; a failure is recorded (with its traceback on stderr) and the run goes on:
    on a short lease, one broken figure must not cost all the others."""
    from .harness import free_device_memory
    from .sections import Skip

    if not allowed:
        say(f"{name}: skipped ({why})")
        report.skip(name, why)
        return
    say(f"{name}: running")
    started = time.perf_counter()
    with report.section(name) as result:
        try:
            fn(result)
        except Skip as exc:
            result.status, result.reason = "skipped", str(exc)
        except Exception as exc:
            traceback.print_exc()
            result.status = "failed"
            result.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            import torch

            free_device_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    say(f"{name}: {result.status} in {time.perf_counter() - started:.1f} s {result.reason}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.wheel_specs:
        print("\n".join(wheel.spec for wheel in deps.WHEELS))
        return 0
    statuses = deps.check()
    if args.check_deps:
        print(deps.describe(statuses))
        return 1 if deps.missing_required(statuses) else 0
    if missing := deps.missing_required(statuses):
        print(deps.missing_message(missing), file=sys.stderr)
        return 2
    only, skip = _names(args.only), _names(args.skip)
    wanted = {name for name in SECTIONS if (not only or name in only) and name not in skip}

    quiet_libraries()
    profile = make_profile(args)
    from . import extras, sections
    from .harness import Jobs, prepare_model
    from .record import Budget, Report, Row, machine_info

    budget = Budget(profile.budget)
    temporary = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    found = {s.name: s.found for s in statuses}
    header = {
        "bench": "atelier gpu-bench",
        "version": 1,
        "machine": machine_info(profile.device),
        "profile": profile.describe(),
        "packages": found,
    }
    report = Report(args.out, header)
    say(
        f"{profile.device}, {profile.model} model, {profile.size}², {profile.steps} steps, dtypes "
        f"{','.join(profile.dtypes)}, {profile.reps} rep(s), budget {profile.budget:.0f} s; JSON → {args.out}"
    )
    model_dir = args.model_dir
    try:
        if model_dir is None:

            def build(result: Any) -> None:
                nonlocal model_dir
                model_dir, facts = prepare_model(profile, workdir)
                params = sum(facts["parameters"].values())
                note = f"{facts['bytes'] / 1e9:.2f} GB on disk" + (f", {params / 1e9:.2f} B params" if params else "")
                result.rows.append(
                    Row(
                        "build",
                        f"write the {profile.model} random SDXL (base + refiner) on {facts['device']}",
                        value=facts["seconds"],
                        note=note,
                    )
                )

            run_section(report, "build", build)
        else:
            report.skip("build", f"--model-dir {model_dir}")
        if model_dir is None:
            return finish(report, budget)

        image_guess = 3.0 if profile.device.type == "cuda" else 0.5
        bench = sections.Bench(
            profile,
            report,
            budget,
            model_dir,
            workdir,
            Jobs(profile),
            image_guess,
            load_s=20.0 if profile.device.type == "cuda" else 2.0,
        )
        guess = sections.estimates(bench)
        compile_planned = profile.compile and "compile" in wanted

        def fits(name: str) -> tuple[bool, str]:
            if name not in wanted:
                return False, "not selected"
            reserve = guess["compile"]() if compile_planned and name != "compile" else 0.0
            estimate = guess[name]()
            ok = budget.allows(estimate, reserve)
            return ok, f"budget: needs ~{estimate:.0f} s (+{reserve:.0f} s kept for compile), {budget.left:.0f} s left"

        for dtype in profile.dtypes:
            main_dtype = dtype == profile.main_dtype
            ok, why = fits("text2img")
            # The main dtype's figures are the headline: they run even over budget.
            run_section(
                report,
                f"text2img {dtype}",
                lambda r, d=dtype: sections.text2img(bench, d, r),
                allowed=(ok or main_dtype) and "text2img" in wanted,
                why=why,
            )
        plan: list[tuple[str, Callable[[Any], None]]] = [
            ("batch", lambda r: sections.batches(bench, r)),
            ("client", lambda r: sections.client(bench, r)),
            ("switch", lambda r: sections.switch(bench, r)),
            ("upscale", lambda r: extras.upscale(bench, r)),
            ("controlnet", lambda r: extras.controlnet(bench, r)),
            ("lora", lambda r: extras.lora(bench, r)),
        ]
        for name, fn in plan:
            ok, why = fits(name)
            run_section(report, name, fn, allowed=ok, why=why)
        ok, why = fits("compile")
        if not profile.compile:
            ok, why = False, "--no-compile"
        try:
            extras.cleanup(bench)
        except Exception as exc:  # compiled figures of a model with LoRA layers left would mislead
            traceback.print_exc()
            ok, why = False, f"the model could not be restored after the LoRA section: {exc}"
        run_section(report, "compile", lambda r: sections.compile_on(bench, r), allowed=ok, why=why)
        if bench.loaded is not None:
            bench.loaded.registry.unload()
        return finish(report, budget)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def finish(report: Any, budget: Any) -> int:
    report.write()
    machine = report.header["machine"]
    where = machine.get("gpu") or f"CPU ({machine.get('cpus')} cores)"
    text = f"### Atelier gpu-bench: {where}, torch {machine['torch']}, {budget.elapsed:.0f} s\n\n{report.table()}\n"
    print("\n" + text)
    if report.out is not None:  # the table beside the JSON, for a lease whose output comes back as files
        report.out.with_suffix(".md").write_text(text)
    failed = [name for name, result in report.sections.items() if result.status == "failed"]
    if failed:
        say(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


__all__ = ["SECTIONS", "main", "parser"]
