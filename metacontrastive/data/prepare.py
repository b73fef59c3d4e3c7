"""``python -m metacontrastive prepare CONVERTER ...``: write a domain's shards and manifest.

``write_domain`` is the one writer of converted data: it splits the items a reader gives
(``metacontrastive.data.readers``) by class for labelled data, by image for caption-only data, loads,
resizes and captions them, and writes them with ``DomainWriter``. The command line below wires the
readers to it; its defaults are the functions' own.

Converters:
    synthetic:   the deterministic demo domains (``metacontrastive.data.synthetic``).
    imagefolder: ROOT/<class>/*.{jpg,jpeg,png}, or ROOT/<split>/<class>/... with the split folders merged.
    captions:    a CSV or JSONL file of image path (relative to the file) + caption (+ label).
    coco:        COCO captions JSON + image folder; caption-only unless --instances labels the images.
    npz:         MedMNIST-style arrays (train_images, train_labels, val_..., test_...) + --labels.

Labelled data is split into train/val/test by class (class-disjoint meta-splits); caption-only data by
image. Images keep their size unless --size is given; JPEG sources written with --image-format jpg and
no --size are copied byte for byte.

Example:
    python -m metacontrastive prepare imagefolder /data/brain-tumor-mri --domain medical \\
        --out /tmp/shards --template "a brain MRI showing {label}" --labels "notumor=no tumor"
"""
from __future__ import annotations

import argparse
import inspect
import io
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from metacontrastive.data import readers
from metacontrastive.data.manifest import ROOT, SPLITS
from metacontrastive.data.readers import Item
from metacontrastive.data.shards import SHARD_SIZE, DomainWriter
from metacontrastive.data.splits import CLASS_FRACTIONS, class_split, explicit_class_split, fraction_split
from metacontrastive.data.synthetic import GENERATORS, write_synthetic

__all__ = ["DEFAULT_TEMPLATE", "Summary", "build_parser", "main", "write_domain"]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {label}"
SKIPPED = "skipped.txt"  # beside the shards: the source files a conversion could not read, with their errors
_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # missing, truncated or not an image


@dataclass
class Summary:
    """What ``write_domain`` wrote: samples and classes per split, and the unreadable images it skipped
    (each ``origin<TAB>error``)."""

    path: Path
    samples: dict[str, int]
    classes: dict[str, int]
    skipped: list[str]


def write_domain(
    items: list[Item],
    domain: str,
    out: str | Path = ROOT,
    *,
    source: str,
    templates: list[str] | None = None,
    class_fractions: tuple[float, float, float] = CLASS_FRACTIONS,
    class_lists: dict[str, list[str]] | None = None,
    image_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    size: int | None = None,
    image_format: str = "png",
    maxcount: int = SHARD_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    strict: bool = False,
) -> Summary:
    """Split ``items`` into train/val/test and write them as ``<out>/<domain>`` shards with a manifest.

    Labelled items are split by class (``class_lists`` if given, else ``class_fractions`` with ``seed``),
    caption-only items by image (``image_fractions``). Each split is shuffled with ``seed`` so that every
    shard mixes classes. Unreadable images are skipped and counted, and named with their error in
    ``<out>/<domain>/skipped.txt`` (``strict``: raise instead).

    Args:
        items: from a ``read_*`` function; all labelled or all caption-only.
        domain: the domain name (a folder under ``out`` and the prefix of sample keys).
        out: the shards root.
        source: where the data came from, recorded in the manifest.
        templates: class prompt templates with a ``{label}`` field (default ``[DEFAULT_TEMPLATE]``); a
            labelled item without captions gets one of them, filled in, as its caption.
        class_fractions: train, val and test fractions of the classes.
        class_lists: explicit class names per split (overrides ``class_fractions``).
        image_fractions: train, val and test fractions of the images of caption-only data.
        size: resize so that the shorter side is ``size`` (aspect kept); None keeps the source size.
        image_format: ``png`` or ``jpg``; JPEG sources kept at their size are written as they are.
        maxcount: samples per shard.
        seed: seeds the splits, the shuffles and the template choice.
        overwrite: replace the domain's existing shards.
        strict: raise on the first unreadable image instead of skipping it.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", domain):
        raise ValueError(f"domain {domain!r} names a folder and prefixes sample keys: use letters, digits, - and _")
    if not items:
        raise ValueError(f"no images to write for domain {domain!r}")
    labelled = items[0].label is not None
    if any((item.label is not None) != labelled for item in items):
        raise ValueError("some items have a label and some do not; a domain is either labelled or caption-only")
    templates = _check_templates(templates if templates is not None else ([DEFAULT_TEMPLATE] if labelled else []))
    classes, by_split = _split(items, labelled, class_fractions, class_lists, image_fractions, seed)
    index = {name: i for i, name in enumerate(classes)}
    rng = random.Random(seed)
    for split in SPLITS:
        rng.shuffle(by_split[split])  # mix classes in every shard: the training stream's shuffle buffer is smaller than a split
    order = [(split, item) for split in SPLITS for item in by_split[split]]
    skipped = []
    with DomainWriter(out, domain, classes, templates, source, maxcount, image_format, overwrite) as writer:
        for n, (split, item) in enumerate(tqdm(order, desc=domain, unit="img", leave=False)):
            try:
                image = _load_image(item, size, image_format)
            except _UNREADABLE as err:
                if strict:
                    raise ValueError(f"cannot read image {item.origin}: {err}") from err
                skipped.append(f"{item.origin}\t{err}")
                continue
            caption = item.captions[0] if item.captions else rng.choice(templates).format(label=item.label)
            extra = {"origin": item.origin, **({"captions": item.captions} if len(item.captions) > 1 else {})}
            writer.write(split, f"{domain}-{n:07d}", image, caption, index.get(item.label), extra)
        if skipped:
            writer.note(SKIPPED, "\n".join(skipped) + "\n")
    if skipped:
        log.warning("domain %r: skipped %d unreadable images, each named with its error in %s (e.g. %s); pass --strict "
                    "to stop at the first", domain, len(skipped), Path(out) / domain / SKIPPED,
                    ", ".join(line.split("\t")[0] for line in skipped[:3]))
    return Summary(Path(out) / domain, {s: sum(c.values()) for s, c in writer.counts.items()},
                   {s: sum(name is not None for name in c) for s, c in writer.counts.items()}, skipped)


def _split(items: list[Item], labelled: bool, class_fractions: tuple[float, float, float],
           class_lists: dict[str, list[str]] | None, image_fractions: tuple[float, float, float],
           seed: int) -> tuple[list[str], dict[str, list[Item]]]:
    """The classes to write and the items of each split."""
    if not labelled:
        if class_lists:
            raise ValueError("caption-only data has no classes to list; split it by image with --image-split")
        cut = fraction_split(len(items), image_fractions, seed)
        return [], {split: [items[i] for i in idx] for split, idx in cut.items()}
    classes = sorted({item.label for item in items})
    chosen = explicit_class_split(classes, class_lists) if class_lists else class_split(classes, class_fractions, seed)
    where = {name: split for split, names in chosen.items() for name in names}
    return [c for c in classes if c in where], {s: [it for it in items if where.get(it.label) == s] for s in SPLITS}


def _load_image(item: Item, size: int | None, image_format: str) -> Image.Image | bytes:
    """The item's image, resized; a JPEG file's own bytes when it needs neither resizing nor re-encoding."""
    if item.array is not None:
        array = item.array[..., 0] if item.array.ndim == 3 and item.array.shape[-1] == 1 else item.array  # (H, W[, 3])
        image = Image.fromarray(array)
    else:
        data = item.path.read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not in a training run
        if image.format == "JPEG" and image_format == "jpg" and size is None:
            return data
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit scans: stretch min..max to 0..255
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(), array.max()
        image = Image.fromarray(((array - low) * (255.0 / max(high - low, 1e-12))).round().astype(np.uint8))
    elif image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if size is None:
        return image
    scale = size / min(image.size)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if shape == image.size else image.resize(shape, Image.BICUBIC)


def _check_templates(templates: list[str]) -> list[str]:
    for template in templates:
        try:
            filled = template.format(label="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"caption template {template!r} may only use the field {{label}}: {err!r}") from None
        if filled == template:
            raise ValueError(f"caption template {template!r} has no {{label}} field")
    return list(templates)


def _default(function, name: str):
    """The default of ``function``'s parameter ``name``: the command line states no default of its own."""
    return inspect.signature(function).parameters[name].default




def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or abs(sum(parts) - 1.0) > 1e-6 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"need three fractions train,val,test that sum to 1, got {text!r}")
    return parts


def _label_map(text: str) -> dict[str, str]:
    try:
        return readers.parse_label_map(text)
    except (OSError, ValueError) as err:  # argparse would hide the message of a plain ValueError
        raise argparse.ArgumentTypeError(str(err)) from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _common() -> argparse.ArgumentParser:
    """Options every real-data converter takes; their defaults are ``write_domain``'s."""
    p = argparse.ArgumentParser(add_help=False)

    def default(name: str):
        return _default(write_domain, name)

    p.add_argument("--domain", required=True, help="domain name: the folder under --out (letters, digits, -, _)")
    p.add_argument("--out", default=default("out"), help="shards root (default: %(default)s)")
    p.add_argument("--seed", type=int, default=default("seed"), help="seeds the splits, shuffles and template choice")
    p.add_argument("--class-split", type=_fractions, default=default("class_fractions"),
                   help="train,val,test class fractions of labelled data (default: %(default)s)")
    for split in SPLITS:
        p.add_argument(f"--{split}-classes", type=_names, default=None, metavar="A,B,...",
                       help=f"explicit {split} classes (overrides --class-split; unlisted classes are left out)")
    p.add_argument("--test-only", action="store_true",
                   help="every class to the test split: an evaluation-only domain (e.g. one held out from training)")
    p.add_argument("--image-split", type=_fractions, default=default("image_fractions"),
                   help="train,val,test image fractions of caption-only data (default: %(default)s)")
    p.add_argument("--template", action="append", default=default("templates"),
                   help=f"caption template with {{label}}, repeatable (default: {DEFAULT_TEMPLATE!r})")
    p.add_argument("--labels", type=_label_map, default=None,
                   help='class names: "0=adipose,1=background" or a .json file; renames folder/label values')
    p.add_argument("--size", type=int, default=default("size"), help="resize the shorter side to SIZE px (default: keep)")
    p.add_argument("--image-format", choices=("png", "jpg"), default=default("image_format"),
                   help="image encoding (default: %(default)s)")
    p.add_argument("--maxcount", type=int, default=default("maxcount"), help="samples per shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the domain")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metacontrastive prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="converter", required=True)
    syn = sub.add_parser("synthetic", help="deterministic demo shards")

    def synthetic(name: str):
        return _default(write_synthetic, name)

    syn.add_argument("--domain", required=True, help=f"comma-separated, from {sorted(GENERATORS)}")
    syn.add_argument("--out", default=synthetic("out"), help="shards root (default: %(default)s)")
    syn.add_argument("--per-class", type=int, default=synthetic("per_class"), help="images per class (default: %(default)s)")
    syn.add_argument("--size", type=int, default=synthetic("size"), help="image side in pixels (default: %(default)s)")
    syn.add_argument("--seed", type=int, default=synthetic("seed"))
    syn.add_argument("--class-split", type=_fractions, default=synthetic("class_fractions"),
                     help="train,val,test class fractions (default: %(default)s)")
    syn.add_argument("--maxcount", type=int, default=synthetic("maxcount"), help="samples per shard (default: %(default)s)")
    syn.add_argument("--overwrite", action="store_true", help="replace existing shards of the domain")

    common = [_common()]
    folder = sub.add_parser("imagefolder", parents=common, help="ROOT/<class>/*.jpg (split folders merged)")
    folder.add_argument("root", help="the image folder")
    caps = sub.add_parser("captions", parents=common, help="CSV/JSONL of image path + caption (+ label)")
    caps.add_argument("file", help="a .csv (with a header) or .jsonl file; image paths are relative to it")
    for option in ("image_column", "caption_column", "label_column"):
        caps.add_argument("--" + option.replace("_", "-"), default=_default(readers.read_captions, option),
                          help="default: %(default)s" + (" (caption-only data)" if option == "label_column" else ""))
    coco = sub.add_parser("coco", parents=common, help="COCO captions JSON + image folder")
    coco.add_argument("--captions", action="append", required=True, help="captions_*.json, repeatable")
    coco.add_argument("--images", action="append", required=True, help="image folder of each --captions file")
    coco.add_argument("--instances", action="append", default=None,
                      help="instances_*.json per --captions file: label = most frequent category (default: caption-only)")
    npz = sub.add_parser("npz", parents=common, help="MedMNIST-style arrays + --labels")
    npz.add_argument("file", help="a .npz with <split>_images and <split>_labels")
    return parser


def _read(args: argparse.Namespace) -> tuple[list[Item], str]:
    """The items of the chosen source and a description of it for the manifest."""
    if args.converter == "imagefolder":
        return readers.read_imagefolder(args.root, args.labels), f"imagefolder:{args.root}"
    if args.converter == "captions":
        items = readers.read_captions(args.file, args.image_column, args.caption_column, args.label_column, args.labels)
        return items, f"captions:{args.file}"
    if args.converter == "coco":
        return readers.read_coco(args.captions, args.images, args.instances, args.labels), f"coco:{','.join(args.captions)}"
    if args.labels is None:
        raise SystemExit("npz needs --labels: the class name of every label value, e.g. \"0=adipose,1=background\"")
    return readers.read_npz(args.file, args.labels), f"npz:{args.file}"


def _convert(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    items, source = _read(args)
    lists = {s: getattr(args, f"{s}_classes") for s in ("train", "val", "test")}
    if args.test_only:
        if any(lists.values()):
            raise ValueError("--test-only puts every class in the test split; leave out --train/--val/--test-classes")
        if any(item.label is None for item in items):
            raise ValueError("--test-only splits classes; caption-only data has none (use --image-split)")
        lists = {"test": sorted({item.label for item in items})}
    summary = write_domain(
        items, args.domain, args.out, source=source, templates=args.template, class_fractions=args.class_split,
        class_lists={s: names for s, names in lists.items() if names} if any(lists.values()) else None,
        image_fractions=args.image_split, size=args.size, image_format=args.image_format, maxcount=args.maxcount,
        seed=args.seed, overwrite=args.overwrite, strict=args.strict,
    )
    splits = ", ".join(f"{s} {n} samples" + (f" / {summary.classes[s]} classes" if summary.classes[s] else "")
                       for s, n in summary.samples.items())
    skipped = f"; skipped {len(summary.skipped)}, listed in {summary.path / SKIPPED}" if summary.skipped else ""
    print(f"{args.domain}: wrote {summary.path} ({splits}{skipped}) "
          f"in {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen converter."""
    args = build_parser().parse_args(argv)
    if args.converter == "synthetic":
        for domain in args.domain.split(","):
            start = time.perf_counter()
            path = write_synthetic(domain, args.out, args.per_class, args.size, args.seed, args.class_split,
                                   args.maxcount, args.overwrite)
            print(f"{domain}: wrote {path} in {time.perf_counter() - start:.1f}s")
    else:
        try:
            _convert(args)
        except (OSError, ValueError) as err:  # bad input: say what to fix, without a traceback
            raise SystemExit(f"prepare {args.converter}: error: {err}") from err
