"""Deterministic synthetic demo domains, written as shards by ``write_synthetic``.

``natural``: coloured shapes on textured backgrounds ("a photo of a red star on grass"); a class is a
colour-shape pair, so val and test classes are unseen combinations of seen colours and shapes.
``medical``: greyscale chest-radiograph-like images with a finding in a lung zone ("a chest radiograph
showing a nodule in the left upper lobe"), plus a class with no abnormality.
Each domain has enough classes for 5-way episodes in each class-disjoint split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from metacontrastive.data.manifest import ROOT, SPLITS
from metacontrastive.data.shards import SHARD_SIZE, DomainWriter
from metacontrastive.data.splits import CLASS_FRACTIONS, class_split

__all__ = ["GENERATORS", "write_synthetic"]

_SS = 2  # supersampling factor: draw at twice the size, then downsample (antialiasing)


@dataclass(frozen=True)
class _Generator:
    classes: list[str]
    templates: list[str]  # class prompts: "{label}" is the class name
    render: Callable[[str, np.random.Generator, int], tuple[Image.Image, str]]  # class, rng, size -> image, caption


# ---------------------------------------------------------------- natural
_COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "yellow": (240, 210, 30),
            "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245)}
_SHAPES = ("circle", "square", "triangle", "star", "cross")
_BACKGROUNDS = ("grass", "sand", "water", "sky", "brick", "snow")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(angle + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(angle + k * math.pi / 5)) for k in range(10)]
    elif shape == "cross":
        w = 0.33
        base = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        pts = [(x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)) for x, y in base]
    else:
        raise ValueError(shape)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _background(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    noise = rng.normal(0, 1, (n, n))
    if kind == "grass":
        streaks = np.repeat(rng.normal(0, 1, (1, n)), n, axis=0)
        base, tex = np.array([60, 140, 50]), 18 * streaks + 10 * noise
    elif kind == "sand":
        base, tex = np.array([210, 185, 130]), 12 * noise
    elif kind == "water":
        base, tex = np.array([40, 110, 170]), 20 * np.sin(2 * math.pi * (yy * rng.uniform(4, 8) + rng.uniform()))
    elif kind == "sky":
        base, tex = np.array([140, 190, 235]), -50 * yy + 4 * noise
    elif kind == "brick":
        rows = (yy * 6 + rng.uniform()) % 1 < 0.12
        cols = ((xx * 4 + 0.5 * (np.floor(yy * 6) % 2)) % 1) < 0.08
        base, tex = np.array([160, 70, 50]), 70 * (rows | cols) + 8 * noise
    else:  # snow
        base, tex = np.array([225, 230, 238]), 8 * noise
    img = base[None, None, :] + tex[..., None] * np.array([1.0, 1.0, 1.0])
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_natural(label: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    colour, shape = label.split(" ")
    background = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    n = size * _SS
    image = Image.fromarray(_background(background, rng, n))
    draw = ImageDraw.Draw(image)
    r = n * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(r, n - r, size=2)
    rgb = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in _COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=rgb)
    return image.resize((size, size), Image.LANCZOS), f"a photo of a {label} on {background}"


# ---------------------------------------------------------------- medical
_FINDINGS = ("a nodule", "a mass", "a cavity", "calcifications", "a consolidation", "a fracture line")
_ZONES = {"left upper lobe": (0.70, 0.35), "left lower lobe": (0.70, 0.68),
          "right upper lobe": (0.30, 0.35), "right lower lobe": (0.30, 0.68)}  # patient's left is image right
_NORMAL = "no abnormality"


def _chest(rng: np.random.Generator, n: int) -> Image.Image:
    image = Image.new("L", (n, n), 20)
    draw = ImageDraw.Draw(image)
    body = rng.uniform(0.04, 0.08) * n
    draw.ellipse([body, 0.05 * n, n - body, 1.1 * n], fill=int(rng.uniform(120, 150)))
    for side in (0.30, 0.70):  # lung fields
        cx = side * n + rng.normal(0, 0.01 * n)
        draw.ellipse([cx - 0.17 * n, 0.15 * n, cx + 0.17 * n, 0.88 * n], fill=int(rng.uniform(45, 65)))
    draw.rectangle([0.46 * n, 0.05 * n, 0.54 * n, n], fill=170)  # spine and mediastinum
    for k in range(6):  # ribs
        y = (0.2 + 0.11 * k) * n
        for x0, x1 in ((0.12, 0.47), (0.53, 0.88)):
            draw.arc([x0 * n, y - 0.05 * n, x1 * n, y + 0.08 * n], 200, 340, fill=105, width=max(1, n // 40))
    return image


def _render_medical(label: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    n = size * _SS
    image = _chest(rng, n)
    draw = ImageDraw.Draw(image)
    if label != _NORMAL:
        finding, zone = label.split(" in the ")
        fx, fy = (np.array(_ZONES[zone]) + rng.normal(0, 0.03, 2)) * n
        if finding == "a nodule":
            r = rng.uniform(0.035, 0.05) * n
            draw.ellipse([fx - r, fy - r, fx + r, fy + r], fill=200)
        elif finding == "a mass":
            r = rng.uniform(0.09, 0.12) * n
            pts = [(fx + r * rng.uniform(0.8, 1.2) * math.cos(a), fy + r * rng.uniform(0.8, 1.2) * math.sin(a))
                   for a in np.linspace(0, 2 * math.pi, 9)[:-1]]
            draw.polygon(pts, fill=185)
        elif finding == "a cavity":
            r = rng.uniform(0.07, 0.09) * n
            draw.ellipse([fx - r, fy - r, fx + r, fy + r], outline=215, width=max(2, n // 24))
        elif finding == "calcifications":
            for _ in range(5):
                px, py = fx + rng.normal(0, 0.04 * n), fy + rng.normal(0, 0.04 * n)
                draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=250)
        elif finding == "a consolidation":
            patch = Image.new("L", (n, n), 0)
            ImageDraw.Draw(patch).ellipse([fx - 0.13 * n, fy - 0.09 * n, fx + 0.13 * n, fy + 0.09 * n], fill=90)
            patch = patch.filter(ImageFilter.GaussianBlur(0.03 * n))
            image = Image.fromarray(np.clip(np.asarray(image, np.int16) + np.asarray(patch), 0, 255).astype(np.uint8))
        else:  # a fracture line: a bright oblique line through the zone
            dx, dy = 0.12 * n * math.cos(rng.uniform(0.3, 1.2)), 0.12 * n * math.sin(rng.uniform(0.3, 1.2))
            draw.line([fx - dx, fy - dy, fx + dx, fy + dy], fill=240, width=max(2, n // 32))
    array = np.asarray(image, np.float32) + rng.normal(0, 6, (n, n))  # film grain
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).resize((size, size), Image.LANCZOS)
    view = ("a frontal", "a posteroanterior", "an anteroposterior")[rng.integers(3)]
    return image.convert("RGB"), f"{view} chest radiograph showing {label}"


GENERATORS: dict[str, _Generator] = {
    "natural": _Generator(
        classes=[f"{c} {s}" for c in _COLOURS for s in _SHAPES],
        templates=["a photo of a {label}", "a picture of a {label}"],
        render=_render_natural,
    ),
    "medical": _Generator(
        classes=[f"{f} in the {z}" for f in _FINDINGS for z in _ZONES] + [_NORMAL],
        templates=["a chest radiograph showing {label}", "a chest x-ray showing {label}"],
        render=_render_medical,
    ),
}


def write_synthetic(
    domain: str,
    out: str | Path = ROOT,
    per_class: int = 60,
    size: int = 32,
    seed: int = 0,
    class_fractions: tuple[float, float, float] = CLASS_FRACTIONS,
    maxcount: int = SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Render ``per_class`` images for every class of ``domain`` and write them as shards.

    Returns:
        The domain folder holding the shards and manifest.
    """
    if domain not in GENERATORS:
        raise ValueError(f"no synthetic generator for domain {domain!r}; known: {sorted(GENERATORS)}")
    gen = GENERATORS[domain]
    splits = class_split(gen.classes, class_fractions, seed)
    rng = np.random.default_rng([seed, sorted(GENERATORS).index(domain)])
    total = per_class * len(gen.classes)
    with DomainWriter(out, domain, gen.classes, gen.templates, f"synthetic:{domain}", maxcount, overwrite=overwrite) as writer:
        with tqdm(total=total, desc=f"synthetic {domain}", unit="img", leave=False) as bar:
            for split in SPLITS:
                for name in splits[split]:
                    label = gen.classes.index(name)
                    for i in range(per_class):
                        image, caption = gen.render(name, rng, size)
                        writer.write(split, f"{domain}-{label:03d}-{i:05d}", image, caption, label)
                        bar.update()
    return Path(out) / domain
