"""Generation parameters inside the image file, A1111-style, so tools that read Automatic1111's
"PNG info" (and people) can see how an image was made.

The text, as A1111 writes it::

    a lighthouse at dusk, oil painting
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 1024x1024, Model: sdxl

PNG carries it in a `parameters` text chunk (tEXt, or iTXt when not Latin-1). When a size
limit is given and the PNG is over it, the image falls back to WebP (quality 95) and then JPEG
at decreasing quality; those carry the text in EXIF UserComment ("UNICODE" + UTF-16, big-endian
EXIF, as piexif/A1111 write it) and again in XMP (`exif:UserComment`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from PIL import Image, PngImagePlugin

from engine.api import ImageFormat, ImageOut
from engine.options import DRAFT_SAMPLER_LABELS, SAMPLER_LABELS

# Members' samplers and draft mode's: every sampler a job can run, by the name written.
_SAMPLER_NAMES = {**SAMPLER_LABELS, **DRAFT_SAMPLER_LABELS}
_SAMPLER_IDS = {label: key for key, label in _SAMPLER_NAMES.items()}

# params key → (A1111 label, type). width/height travel together as "Size: WxH".
_FIELDS: dict[str, tuple[str, type]] = {
    "steps": ("Steps", int),
    "sampler": ("Sampler", str),
    "cfg": ("CFG scale", float),
    "seed": ("Seed", int),
    "size": ("Size", str),
    "model": ("Model", str),
    "strength": ("Denoising strength", float),
    "refiner": ("Refiner", str),
    "refiner_switch": ("Refiner switch at", float),
    "upscale": ("Hires upscale", float),
    # Editing (Vary Region, Zoom Out, Pan): enough to redo a result from its metadata.
    "kind": ("Atelier kind", str),
    "region": ("Inpaint region", str),
    "mask_blur": ("Mask blur", int),
    "zoom": ("Zoom out", float),
    "pan": ("Pan", str),
    # Styling: A1111's own labels for LoRA and embedding hashes (the LoRAs themselves are
    # `<lora:name:weight>` tags in the prompt, as A1111 writes them), then ours.
    "lora_hashes": ("Lora hashes", str),
    "ti_hashes": ("TI hashes", str),
    "style": ("Style", str),
    "draft": ("Draft", str),
    "job_id": ("Job", str),
    "version": ("Version", str),
}
# A LoRA in A1111's prompt syntax: <lora:name:weight>.
_LORA_TAG = re.compile(r"\s*<lora:([^:<>]+):(-?[0-9]*\.?[0-9]+)>")
_LABELS = {label: key for key, (label, _) in _FIELDS.items()}
_NEGATIVE = "Negative prompt: "
# One "Key: value" of the last line; a value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*([\w][\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

PARAMETERS_KEY = "parameters"
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
JPEG_QUALITIES = (95, 90, 85, 80, 75, 70, 60, 50, 40, 30)
MIN_FALLBACK_SIDE = 64


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _quote(value: str) -> str:
    """A1111 quotes values holding a comma, colon or quote as JSON strings."""
    if any(char in value for char in ',:"\n') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def controlnet_unit(*, module: str, model: str, weight: float, guidance_start: float, guidance_end: float) -> str:
    """One ControlNet unit as A1111's ControlNet extension writes it (the value of `ControlNet 0`,
    which format_parameters quotes), so metadata readers that know it understand ours."""
    fields = (
        ("Module", module),
        ("Model", model),
        ("Weight", _number(weight)),
        ("Resize Mode", "Crop and Resize"),
        ("Guidance Start", _number(guidance_start)),
        ("Guidance End", _number(guidance_end)),
    )
    return ", ".join(f"{label}: {value}" for label, value in fields)


def format_parameters(params: Mapping[str, Any]) -> str:
    """A1111's text for `params`: keys prompt, negative, steps, sampler (our id), cfg, seed, width,
    height, model, and optional strength, refiner, refiner_switch, upscale, kind, region,
    mask_blur, zoom, pan, job_id, version; loras ((name, weight) pairs, written as A1111's
    `<lora:name:weight>` after the prompt), lora_hashes, ti_hashes, style, draft; any other key is
    written under its own name with a str value."""
    lines = [str(params.get("prompt", "")) + "".join(f" <lora:{n}:{_number(w)}>" for n, w in params.get("loras") or ())]
    negative = str(params.get("negative", "") or "")
    if negative:
        lines.append(_NEGATIVE + negative)
    parts: list[str] = []
    for key, value in params.items():
        if key in ("prompt", "negative", "width", "height", "loras") or value is None:
            continue
        if key == "sampler":
            text = _SAMPLER_NAMES.get(str(value), str(value))
        elif key in _FIELDS and _FIELDS[key][1] in (int, float):
            text = _number(value) if _FIELDS[key][1] is float else str(int(value))
        else:
            text = str(value)
        label = _FIELDS[key][0] if key in _FIELDS else key
        parts.append(f"{label}: {_quote(text)}")
        if key == "seed" and "width" in params and "height" in params:
            parts.append(f"Size: {int(params['width'])}x{int(params['height'])}")
    if "width" in params and "height" in params and "seed" not in params:
        parts.append(f"Size: {int(params['width'])}x{int(params['height'])}")
    if parts:
        lines.append(", ".join(parts))
    return "\n".join(lines)


def _parse_value(key: str, raw: str) -> Any:
    raw = raw.strip()
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = raw[1:-1]
    if key == "sampler":
        return _SAMPLER_IDS.get(raw, raw)
    kind = _FIELDS[key][1] if key in _FIELDS else str
    try:
        return kind(raw) if kind is not float else float(raw)
    except ValueError:
        return raw


def _split_params(line: str) -> list[tuple[str, str]] | None:
    """The "Key: value" pairs of a parameters line, or None when the line is not one (every
    character must belong to a pair; linear time, no backtracking across pairs)."""
    pairs: list[tuple[str, str]] = []
    position = 0
    for match in _PARAM.finditer(line):
        if match.start() != position:
            return None
        pairs.append((match.group(1).strip(), match.group(2)))
        position = match.end()
    return pairs if pairs and position == len(line) else None


def parse_parameters(text: str) -> dict[str, Any]:
    """Inverse of `format_parameters` (also reads what A1111 writes): prompt, negative and the
    last line's "Key: value" pairs, known labels mapped back to our keys and types."""
    lines = text.split("\n")
    pairs = _split_params(lines[-1]) if len(lines) > 1 else None
    if pairs is not None:
        lines.pop()
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :]
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    loras = [(name, float(weight)) for name, weight in _LORA_TAG.findall(prompt)]
    result: dict[str, Any] = {"prompt": _LORA_TAG.sub("", prompt), "negative": "\n".join(negative_lines)}
    if loras:
        result["loras"] = loras
    for label, raw in pairs or ():
        key = _LABELS.get(label, label)
        if key == "size":
            size = re.fullmatch(r"\s*(\d+)x(\d+)\s*", raw)
            if size:
                result["width"], result["height"] = int(size[1]), int(size[2])
                continue
        result[key] = _parse_value(key, raw)
    return result


# ------------------------------------------------------------------------------------ encoding


def _exif_bytes(text: str) -> bytes:
    exif = Image.Exif()
    exif.endian = ">"  # big-endian, so the UTF-16BE comment matches the file's byte order
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf-16-be")
    return exif.tobytes()


def _xmp_bytes(text: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:exif="http://ns.adobe.com/exif/1.0/">'
        '<exif:UserComment><rdf:Alt><rdf:li xml:lang="x-default">'
        f"{escape(text)}"
        "</rdf:li></rdf:Alt></exif:UserComment></rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def _save(image: Image.Image, fmt: ImageFormat, text: str, quality: int = 95) -> bytes:
    out = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, text)
        # Level 4: within a few % of level 6's size at about half the time on noisy images.
        image.save(out, "PNG", pnginfo=info, compress_level=4)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=quality, method=4, exif=_exif_bytes(text), xmp=_xmp_bytes(text))
    else:
        image.save(out, "JPEG", quality=quality, optimize=True, exif=_exif_bytes(text), xmp=_xmp_bytes(text))
    return out.getvalue()


def encode_image(image: Image.Image, params: Mapping[str, Any], *, max_bytes: int | None = None) -> ImageOut:
    """The image as PNG with `params` embedded; when `max_bytes` is given and the PNG is over it,
    WebP q95, then JPEG at decreasing quality, then (last resort) JPEG at smaller sizes."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    full = dict(params)
    full.setdefault("width", image.width)
    full.setdefault("height", image.height)
    text = format_parameters(full)
    seed = int(params.get("seed", 0))

    def out(data: bytes, fmt: ImageFormat, img: Image.Image) -> ImageOut:
        return ImageOut(data=data, format=fmt, seed=seed, width=img.width, height=img.height)

    data = _save(image, "png", text)
    if max_bytes is None or len(data) <= max_bytes:
        return out(data, "png", image)
    data = _save(image, "webp", text, 95)
    if len(data) <= max_bytes:
        return out(data, "webp", image)
    for quality in JPEG_QUALITIES:
        data = _save(image, "jpeg", text, quality)
        if len(data) <= max_bytes:
            return out(data, "jpeg", image)
    smaller = image
    while min(smaller.size) > MIN_FALLBACK_SIDE:
        size = (max(1, round(smaller.width * 0.75)), max(1, round(smaller.height * 0.75)))
        smaller = smaller.resize(size, Image.Resampling.LANCZOS)
        data = _save(smaller, "jpeg", text, 85)
        if len(data) <= max_bytes:
            return out(data, "jpeg", smaller)
    raise ValueError(f"cannot encode the image under {max_bytes} bytes")


def _decode_user_comment(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE_PREFIX:
        # Big-endian per piexif; a little-endian writer shows up as NULs at even positions.
        if len(body) >= 2 and body[0] == 0 and body[1] != 0:
            return body.decode("utf-16-be", errors="replace")
        if len(body) >= 2 and body[1] == 0 and body[0] != 0:
            return body.decode("utf-16-le", errors="replace")
        return body.decode("utf-16-be", errors="replace")
    if prefix in (_ASCII_PREFIX, b"\x00" * 8):
        return body.rstrip(b"\x00").decode("utf-8", errors="replace")
    return raw.decode("utf-8", errors="replace")


def _text_from_xmp(xmp: bytes | str) -> str | None:
    try:
        root = ElementTree.fromstring(xmp.encode() if isinstance(xmp, str) else xmp.strip(b"\x00"))
    except ElementTree.ParseError:
        return None
    for element in root.iter("{http://ns.adobe.com/exif/1.0/}UserComment"):
        item = element.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li")
        return (item.text if item is not None else element.text) or ""
    return None


def read_parameters_text(data: bytes) -> str | None:
    """The raw parameters text embedded in an encoded image (PNG, WebP or JPEG), or None."""
    with Image.open(io.BytesIO(data)) as image:
        if PARAMETERS_KEY in image.info and isinstance(image.info[PARAMETERS_KEY], str):
            return image.info[PARAMETERS_KEY]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        if comment:
            return _decode_user_comment(comment)
        if image.info.get("xmp"):
            return _text_from_xmp(image.info["xmp"])
    return None


def read_parameters(data: bytes) -> dict[str, Any] | None:
    text = read_parameters_text(data)
    return parse_parameters(text) if text is not None else None


__all__ = [
    "SAMPLER_LABELS",
    "controlnet_unit",
    "encode_image",
    "format_parameters",
    "parse_parameters",
    "read_parameters",
    "read_parameters_text",
]
