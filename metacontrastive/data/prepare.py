"""``python -m metacontrastive prepare CONVERTER ...``: write a domain's shards and manifest.

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
import time

from metacontrastive.data import converters as conv
from metacontrastive.data.synthetic import GENERATORS, write_synthetic

__all__ = ["build_parser", "main"]


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
        return conv.parse_label_map(text)
    except (OSError, ValueError) as err:  # argparse would hide the message of a plain ValueError
        raise argparse.ArgumentTypeError(str(err)) from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _common() -> argparse.ArgumentParser:
    """Options every real-data converter takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--domain", required=True, help="domain name: the folder under --out (letters, digits, -, _)")
    p.add_argument("--out", default="data/shards", help="shards root (default: data/shards)")
    p.add_argument("--seed", type=int, default=0, help="seeds the splits, shuffles and template choice")
    p.add_argument("--class-split", type=_fractions, default=(0.6, 0.2, 0.2),
                   help="train,val,test class fractions of labelled data (default: 0.6,0.2,0.2)")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}-classes", type=_names, default=None, metavar="A,B,...",
                       help=f"explicit {split} classes (overrides --class-split; unlisted classes are left out)")
    p.add_argument("--test-only", action="store_true",
                   help="every class to the test split: an evaluation-only domain (e.g. one held out from training)")
    p.add_argument("--image-split", type=_fractions, default=(0.8, 0.1, 0.1),
                   help="train,val,test image fractions of caption-only data (default: 0.8,0.1,0.1)")
    p.add_argument("--template", action="append", default=None,
                   help=f"caption template with {{label}}, repeatable (default: {conv.DEFAULT_TEMPLATE!r})")
    p.add_argument("--labels", type=_label_map, default=None,
                   help='class names: "0=adipose,1=background" or a .json file; renames folder/label values')
    p.add_argument("--size", type=int, default=None, help="resize the shorter side to SIZE px (default: keep)")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png", help="image encoding (default: png)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the domain")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metacontrastive prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="converter", required=True)
    syn = sub.add_parser("synthetic", help="deterministic demo shards")
    syn.add_argument("--domain", required=True, help=f"comma-separated, from {sorted(GENERATORS)}")
    syn.add_argument("--out", default="data/shards", help="shards root (default: data/shards)")
    syn.add_argument("--per-class", type=int, default=60, help="images per class")
    syn.add_argument("--size", type=int, default=32, help="image side in pixels")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--class-split", type=_fractions, default=(0.6, 0.2, 0.2), help="train,val,test class fractions")
    syn.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    syn.add_argument("--overwrite", action="store_true", help="replace existing shards of the domain")

    common = [_common()]
    folder = sub.add_parser("imagefolder", parents=common, help="ROOT/<class>/*.jpg (split folders merged)")
    folder.add_argument("root", help="the image folder")
    caps = sub.add_parser("captions", parents=common, help="CSV/JSONL of image path + caption (+ label)")
    caps.add_argument("file", help="a .csv (with a header) or .jsonl file; image paths are relative to it")
    caps.add_argument("--image-column", default="image", help="default: image")
    caps.add_argument("--caption-column", default="caption", help="default: caption")
    caps.add_argument("--label-column", default=None, help="class column (default: none, caption-only)")
    coco = sub.add_parser("coco", parents=common, help="COCO captions JSON + image folder")
    coco.add_argument("--captions", action="append", required=True, help="captions_*.json, repeatable")
    coco.add_argument("--images", action="append", required=True, help="image folder of each --captions file")
    coco.add_argument("--instances", action="append", default=None,
                      help="instances_*.json per --captions file: label = most frequent category (default: caption-only)")
    npz = sub.add_parser("npz", parents=common, help="MedMNIST-style arrays + --labels")
    npz.add_argument("file", help="a .npz with <split>_images and <split>_labels")
    return parser


def _read(args: argparse.Namespace) -> tuple[list[conv.Item], str]:
    """The items of the chosen source and a description of it for the manifest."""
    if args.converter == "imagefolder":
        return conv.read_imagefolder(args.root, args.labels), f"imagefolder:{args.root}"
    if args.converter == "captions":
        items = conv.read_captions(args.file, args.image_column, args.caption_column, args.label_column, args.labels)
        return items, f"captions:{args.file}"
    if args.converter == "coco":
        return conv.read_coco(args.captions, args.images, args.instances, args.labels), f"coco:{','.join(args.captions)}"
    if args.labels is None:
        raise SystemExit("npz needs --labels: the class name of every label value, e.g. \"0=adipose,1=background\"")
    return conv.read_npz(args.file, args.labels), f"npz:{args.file}"


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
    summary = conv.write_domain(
        items, args.domain, args.out, source=source, templates=args.template, class_fractions=args.class_split,
        class_lists={s: names for s, names in lists.items() if names} if any(lists.values()) else None,
        image_fractions=args.image_split, size=args.size, image_format=args.image_format, maxcount=args.maxcount,
        seed=args.seed, overwrite=args.overwrite, strict=args.strict,
    )
    splits = ", ".join(f"{s} {n} samples" + (f" / {summary.classes[s]} classes" if summary.classes[s] else "")
                       for s, n in summary.samples.items())
    print(f"{args.domain}: wrote {summary.path} ({splits}; skipped {len(summary.skipped)}) "
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
