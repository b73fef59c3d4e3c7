"""Raw-data readers: image folders, caption files, COCO, MedMNIST arrays, each to a list of ``Item``.

Each ``read_*`` function turns a source into ``Item`` s (where an image is, its class name or None, its
captions) and checks the source as it goes, with errors that say what to fix. ``prepare.write_domain``
writes the items as a domain's shards.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metacontrastive.data.manifest import SPLITS

__all__ = [
    "IMAGE_SUFFIXES",
    "Item",
    "parse_label_map",
    "read_captions",
    "read_coco",
    "read_imagefolder",
    "read_npz",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Item:
    """One source image before it is written.

    Attributes:
        origin: where it came from (a path relative to the source, or ``file.npz:train/12``); kept in
            the sample's ``json`` as ``origin``.
        label: the class name, or None for caption-only data.
        captions: the source's captions; the first is the sample's ``txt``, all of them go to its
            ``json`` when there are several. Empty: the caption is a filled-in template.
        path: the image file, or None when ``array`` holds the pixels.
        array: uint8 pixels, (H, W) or (H, W, C), or None when ``path`` holds the image.
    """

    origin: str
    label: str | None = None
    captions: list[str] = field(default_factory=list)
    path: Path | None = None
    array: np.ndarray | None = None


def parse_label_map(text: str) -> dict[str, str]:
    """Parse ``"0=adipose,1=background"`` or a JSON file (``{"0": "adipose"}`` or ``["adipose", ...]``)."""
    if text.endswith(".json"):
        data = json.loads(_existing(Path(text), "label map").read_text())
        if isinstance(data, list):
            return {str(i): str(name) for i, name in enumerate(data)}
        if isinstance(data, dict):
            return {str(key): str(name) for key, name in data.items()}
        raise ValueError(f"label map {text} must hold a JSON object {{\"0\": \"name\"}} or a list of names")
    pairs = {}
    for part in text.split(","):
        key, sep, name = part.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise ValueError(f"label map entry {part!r} is not KEY=NAME; write e.g. \"0=adipose,1=background\" "
                             f"or pass a .json file (names with commas)")
        pairs[key.strip()] = name.strip()
    return pairs


def read_imagefolder(root: str | Path, labels: dict[str, str] | None = None) -> list[Item]:
    """Read ``root/<class>/*.{jpg,jpeg,png}``, or ``root/<split>/<class>/...`` with the classes of all
    split folders (``Training/``, ``Testing/``) merged.

    A top-level folder that holds images is a class; one that holds only folders is a split folder.

    Args:
        root: the image folder.
        labels: optional renames from folder name to class name (``notumor=no tumor``).
    """
    root = _existing(Path(root), "image folder")
    class_dirs = []
    for top in _subdirs(root):
        inner = _subdirs(top)
        class_dirs.extend(inner if inner and not _images_in(top) else [top])
    if not class_dirs:
        raise ValueError(f"{root} has no class folders; expected {root}/<class>/*.jpg or {root}/<split>/<class>/*.jpg")
    items = []
    for folder in class_dirs:
        files = _images_in(folder)
        if not files:
            raise ValueError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             f"add images or remove the folder")
        name = (labels or {}).get(folder.name, folder.name)
        items += [Item(str(f.relative_to(root)), label=name, path=f) for f in files]
    return items


def read_captions(file: str | Path, image_column: str = "image", caption_column: str = "caption",
                  label_column: str | None = None, labels: dict[str, str] | None = None) -> list[Item]:
    """Read a CSV (with a header) or JSONL file of image path + caption (+ label).

    Image paths are relative to the file. Rows of the same image are one item with several captions.
    With ``label_column`` the data is labelled, and an empty caption is filled in from the templates.

    Args:
        file: a ``.csv`` or ``.jsonl`` file.
        image_column: the column (key) holding the image path.
        caption_column: the column holding the caption (optional when there is a label column).
        label_column: the column holding the class name, or None for caption-only data.
        labels: optional renames from the file's label to a class name.
    """
    file = _existing(Path(file), "captions file")
    rows = list(_table_rows(file))
    if not rows:
        raise ValueError(f"{file} has no rows")
    needed = [image_column] + ([label_column] if label_column else [caption_column])
    by_path: dict[Path, Item] = {}
    for where, row in rows:
        missing = [c for c in needed if c not in row]
        if missing:
            raise ValueError(f"{file} {where} lacks the columns {missing} (it has {sorted(row)}); "
                             f"name the columns with --image-column, --caption-column and --label-column")
        caption = str(row.get(caption_column) or "").strip()
        label = str(row[label_column] or "").strip() if label_column else None
        if not row[image_column] or label == "" or (label is None and not caption):
            raise ValueError(f"{file} {where} has an empty {'label' if label == '' else 'image or caption'}")
        label = (labels or {}).get(label, label) if label is not None else None
        path = file.parent / str(row[image_column])
        item = by_path.setdefault(path, Item(str(row[image_column]), label=label, path=path))
        if item.label != label:
            raise ValueError(f"{file} {where}: image {item.origin} has two labels, {item.label!r} and {label!r}")
        item.captions += [caption] if caption else []
    return list(by_path.values())


def read_coco(caption_files: list[str | Path], image_dirs: list[str | Path],
              instance_files: list[str | Path] | None = None, labels: dict[str, str] | None = None) -> list[Item]:
    """Read COCO caption files, each with its image folder; one item per image with all its captions.

    Caption-only by default. With ``instance_files`` (one per caption file) the data is labelled: an
    image's class is its most frequent instance category (ties go to the lower category id), and
    images without instances are left out.

    Args:
        caption_files: ``captions_*.json`` files.
        image_dirs: the image folder of each caption file.
        instance_files: optional ``instances_*.json`` files, one per caption file.
        labels: optional renames from category name to class name.
    """
    if len(caption_files) != len(image_dirs) or (instance_files and len(instance_files) != len(caption_files)):
        raise ValueError("pass one --images folder (and, if any, one --instances file) per --captions file")
    items, uncaptioned, unlabelled = [], 0, 0
    for k, (captions_file, image_dir) in enumerate(zip(caption_files, image_dirs)):
        data = _coco_json(captions_file, "captions", "annotations", "images")
        image_dir = _existing(Path(image_dir), "COCO image folder")
        captions = defaultdict(list)
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):
            captions[ann["image_id"]].append(ann["caption"].strip())
        classes = _dominant_categories(instance_files[k]) if instance_files else None
        for image in data["images"]:
            if not captions[image["id"]]:
                uncaptioned += 1
            elif classes is not None and image["id"] not in classes:
                unlabelled += 1
            else:
                label = (labels or {}).get(classes[image["id"]], classes[image["id"]]) if classes is not None else None
                items.append(Item(f"{image_dir.name}/{image['file_name']}", label=label, captions=captions[image["id"]],
                                  path=image_dir / image["file_name"]))
    if uncaptioned or unlabelled:
        log.warning("COCO: left out %d images without captions and %d without instances", uncaptioned, unlabelled)
    return items


def read_npz(file: str | Path, labels: dict[str, str]) -> list[Item]:
    """Read MedMNIST-style arrays: ``<split>_images`` (N, H, W) or (N, H, W, C) uint8 and ``<split>_labels``
    (N,) or (N, 1), for the splits the file has. Its own splits are merged: the meta-split is by class.

    Args:
        file: the ``.npz`` file.
        labels: class name of every label value (``{"0": "adipose", ...}``).
    """
    file = _existing(Path(file), "npz file")
    items = []
    with np.load(file) as data:
        have = sorted(data.files)
        splits = [s for s in SPLITS if f"{s}_images" in have or f"{s}_labels" in have]
        if not splits:
            raise ValueError(f"{file} has no <split>_images/<split>_labels arrays (split: {', '.join(SPLITS)}); it has {have}")
        for split in splits:
            missing = [name for name in (f"{split}_images", f"{split}_labels") if name not in have]
            if missing:
                raise ValueError(f"{file} lacks {missing}: every <split>_images needs its <split>_labels; it has {have}")
            images, values = data[f"{split}_images"], data[f"{split}_labels"]
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
                raise ValueError(f"{file}: {split}_images must be uint8 (N, H, W) or (N, H, W, 1|3), "
                                 f"not {images.dtype} {images.shape}")
            if values.ndim > 2 or values.size != len(images):
                raise ValueError(f"{file}: {split}_labels {values.shape} must hold one label per image "
                                 f"({len(images)}); multi-label arrays are not supported")
            values = values.reshape(-1)  # (N,)
            unnamed = sorted({str(int(v)) for v in np.unique(values)} - set(labels), key=int)
            if unnamed:
                raise ValueError(f"--labels names no class for label values {unnamed} of {file}; "
                                 f"it names {sorted(labels)}")
            items += [Item(f"{file.name}:{split}/{i}", label=labels[str(int(v))], array=images[i])
                      for i, v in enumerate(values)]
    return items


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; check the path")
    return path


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _table_rows(file: Path):
    """Yield ``(where, row)`` pairs of a CSV or JSONL file; ``where`` names the row for error messages."""
    if file.suffix.lower() == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            for n, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield f"line {n}", row
    elif file.suffix.lower() == ".jsonl":
        with file.open(encoding="utf-8") as handle:
            for n, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{file} line {n} is not JSON: {err}") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{file} line {n} is not a JSON object")
                    yield f"line {n}", row
    else:
        raise ValueError(f"captions file {file} must end in .csv or .jsonl")


def _coco_json(file: str | Path, kind: str, *keys: str) -> dict:
    data = json.loads(_existing(Path(file), f"COCO {kind} file").read_text())
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{file} is not a COCO {kind} file: it has no {missing}")
    return data


def _dominant_categories(file: str | Path) -> dict[int, str]:
    """Image id -> name of its most frequent instance category (ties: lower category id)."""
    data = _coco_json(file, "instances", "annotations", "categories")
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts: dict[int, Counter] = defaultdict(Counter)
    for ann in data["annotations"]:
        counts[ann["image_id"]][ann["category_id"]] += 1
    return {image: names[min(c, key=lambda cat: (-c[cat], cat))] for image, c in counts.items()}
