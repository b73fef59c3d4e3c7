"""Are the EfficientNet-Lite weights right, not just loaded? Two checks on real images, pretrained against the
same architecture with random initialisation (``efficientnet-lite{v}:random``).

(a) The ImageNet classifier (``efficientnet_lite_model``, the package's ``_fc`` included) on CIFAR-10 test images
    (32 px, upsampled) and COCO photographs (centre square): how often the top-1 class survives a horizontal
    flip and another input size, the mean max-probability, how many distinct classes it predicts (a random
    net gives one or two classes to everything) and, for CIFAR, the semantic hit rate: the fraction of images
    whose top-5 ImageNet classes include one of a hand-written set for their CIFAR class (ship: container
    ship, liner, fireboat, ...). Right weights give high agreement and hit rates; weights mapped wrongly
    (shifted, BatchNorm statistics swapped) give answers that change with a flip.
(b) Nearest class mean of the frozen pooled features (cosine to the class means of the support), N-way 5-shot
    15-query, on seeded episodes of real image folders at 128 px (the towers run at 128 px too), for the
    pretrained tower, the random one and raw pixels (squared Euclidean, the project's ``pixels`` method),
    with 95% intervals (1.96 std / sqrt(episodes)). Each image's features are computed once per run.

Reads ``--data`` (default ``../shared/data``): ``cifar10-test/<class>/*.jpg``, ``coco-mini/val2017/*.jpg``,
``aid-aerial/<Class>/*.jpg``, ``dtd-textures/<class>/*.jpg``, ``brain-tumor-mri/Testing/<class>/*.jpg``; a
missing folder is skipped with a note. A few minutes on 2 CPU cores with the defaults; a check, not a test.

Usage:
    python bench/check_pretrained.py [--data ../shared/data] [--variant 0] [--episodes 300] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from metacontrastive.models.towers import weights_digest
from metacontrastive.models.towers.base import resize
from metacontrastive.models.towers.efficientnet_lite import efficientnet_lite_model, efficientnet_lite_tower

# ImageNet-1k indices that count as a right answer for each CIFAR-10 class (timm.data.ImageNetInfo names them)
CIFAR_TO_IMAGENET: dict[str, set[int]] = {
    "airplane": {404, 895, 908, 405},
    "automobile": {436, 468, 511, 817, 656, 717, 751, 661, 609, 627},
    "bird": {*range(7, 25), *range(80, 101), *range(127, 147)},
    "cat": set(range(281, 286)),
    "deer": set(range(351, 354)),
    "dog": set(range(151, 269)),
    "frog": set(range(30, 33)),
    "horse": {339, 603},
    "ship": {510, 628, 554, 625, 724, 484, 871, 914, 576, 833, 780, 814},
    "truck": {867, 569, 555, 675, 717, 864},
}
FEWSHOT_FOLDERS = {"aid-aerial": "aid-aerial", "dtd-textures": "dtd-textures", "brain-mri": "brain-tumor-mri/Testing"}


def load_images(paths: list[Path], side: int) -> torch.Tensor:
    """(B, 3, side, side) floats in [0, 1]: each image's centre square, resized (bicubic) to ``side``."""
    out = torch.empty(len(paths), 3, side, side)
    for i, path in enumerate(tqdm(paths, desc=f"read {side}px", leave=False)):
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            image = image.crop((left, top, left + s, top + s)).resize((side, side), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (side*side*3,)
            out[i] = pixels.view(side, side, 3).permute(2, 0, 1) / 255
    return out


@torch.inference_mode()
def run_batches(fn, images: torch.Tensor, desc: str, batch: int = 32) -> torch.Tensor:
    """``fn`` over (B, 3, H, W) images in channels-last batches (twice as fast on a CPU for these depthwise
    convolutions), with a progress bar; the rows concatenated."""
    return torch.cat([fn(images[i:i + batch].contiguous(memory_format=torch.channels_last))
                      for i in tqdm(range(0, len(images), batch), desc=desc, leave=False)])


# ------------------------------------------------------------------ (a) the ImageNet classifier
def classifier_probabilities(model: torch.nn.Module, images: torch.Tensor, side: int, desc: str) -> torch.Tensor:
    """(B, 1000) softmax of ``model`` on images in [0, 1] resized to ``side`` and normalised as the tower does."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)  # mean and std 0.5, as the tower uses
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    def probabilities(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) to (B, 1000)
        x = (resize(x, (side, side), "bicubic") - mean) / std
        return model(x.contiguous(memory_format=torch.channels_last)).softmax(-1)

    return run_batches(probabilities, images, desc)


def classifier_scores(model: torch.nn.Module, images: torch.Tensor, sizes: tuple[int, int], desc: str,
                      targets: list[set[int]] | None = None) -> dict:
    """Flip and size agreement of the top-1 class, mean max-probability, distinct top-1 classes and, given each
    image's set of right ImageNet classes, the per-image top-5 hits."""
    side, other = sizes
    probs = classifier_probabilities(model, images, side, f"{desc} {side}px")  # (B, 1000)
    flipped = classifier_probabilities(model, images.flip(-1), side, f"{desc} flipped")
    resized = classifier_probabilities(model, images, other, f"{desc} {other}px")
    top1 = probs.argmax(-1)  # (B,)
    scores = {
        "flip_agreement": float((top1 == flipped.argmax(-1)).float().mean()),
        "size_agreement": float((top1 == resized.argmax(-1)).float().mean()),
        "mean_max_prob": float(probs.max(-1).values.mean()),
        "distinct_top1": int(top1.unique().numel()),
        "images": len(images),
        "top1": top1.tolist(),
    }
    if targets is not None:
        top5 = probs.topk(5, dim=-1).indices.tolist()  # B lists of 5 class indices
        hits = [bool(set(row) & want) for row, want in zip(top5, targets, strict=True)]
        scores["top5_hit_rate"] = sum(hits) / len(hits)
        scores["hits"] = hits
    return scores


def check_classifier(args, models: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """(a) on CIFAR-10 and COCO: {image set: {model name: scores}}."""
    results: dict[str, dict] = {}
    cifar = args.data / "cifar10-test"
    if cifar.is_dir():
        paths, classes = [], []
        for cls in sorted(CIFAR_TO_IMAGENET):
            files = sorted((cifar / cls).glob("*.jpg"))
            chosen = random.Random(f"cifar-{cls}").sample(files, min(args.cifar_per_class, len(files)))
            paths, classes = paths + chosen, classes + [cls] * len(chosen)
        images = load_images(paths, 32)
        targets = [CIFAR_TO_IMAGENET[cls] for cls in classes]
        results["cifar10"] = {name: classifier_scores(m, images, args.sizes, f"cifar10 {name}", targets)
                              for name, m in models.items()}
        for scores in results["cifar10"].values():
            hits = dict.fromkeys(CIFAR_TO_IMAGENET, 0)
            for hit, cls in zip(scores["hits"], classes, strict=True):
                hits[cls] += hit
            scores["hit_rate_by_class"] = {cls: hits[cls] / classes.count(cls) for cls in sorted(CIFAR_TO_IMAGENET)}
    else:
        print(f"skipped CIFAR-10: no folder {cifar}")
    coco = args.data / "coco-mini" / "val2017"
    if coco.is_dir():
        paths = sorted(coco.glob("*.jpg"))[: args.coco]
        images = load_images(paths, 256)
        results["coco"] = {name: classifier_scores(m, images, args.sizes, f"coco {name}") for name, m in models.items()}
        results["coco"]["files"] = [p.name for p in paths]
    else:
        print(f"skipped COCO: no folder {coco}")
    return results


# ------------------------------------------------------------------ (b) nearest class mean
def sample_episodes(classes: int, per_class: int, ways: int, shots: int, queries: int, count: int,
                    seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded episodes over a pool of ``per_class`` images a class (row ``c * per_class + i``): ``count`` pairs of
    (support rows (N*K,), query rows (N*Q,)), both class-major, so episode labels are ``arange(N)`` repeated."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(count):
        chosen = torch.randperm(classes, generator=g)[:ways]  # (N,)
        rows = torch.stack([c * per_class + torch.randperm(per_class, generator=g)[: shots + queries] for c in chosen])
        episodes.append((rows[:, :shots].reshape(-1), rows[:, shots:].reshape(-1)))  # (N*K,), (N*Q,)
    return episodes


def nearest_class_mean(features: torch.Tensor, episodes: list[tuple[torch.Tensor, torch.Tensor]], ways: int,
                       metric: str) -> tuple[float, float]:
    """Mean accuracy and 95% interval of nearest class mean over ``episodes`` of rows of ``features`` (R, D).

    ``metric``: ``cosine`` (normalised features against normalised class means) or ``euclidean`` (squared).
    """
    accuracies = []
    for support_rows, query_rows in episodes:
        support, query = features[support_rows], features[query_rows]  # (N*K, D), (N*Q, D)
        if metric == "cosine":
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        means = support.view(ways, -1, support.shape[-1]).mean(1)  # (N, D): rows are class-major
        if metric == "cosine":
            predicted = (query @ F.normalize(means, dim=-1).t()).argmax(1)  # (N*Q,)
        else:
            predicted = torch.cdist(query, means).argmin(1)
        truth = torch.arange(ways).repeat_interleave(len(query_rows) // ways)  # (N*Q,)
        accuracies.append(float((predicted == truth).float().mean()))
    acc = torch.tensor(accuracies, dtype=torch.float64)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(len(acc)))


def check_fewshot(args, towers: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """(b) on each image folder: {folder: {features: (mean accuracy, ci95)} plus ways and images}."""
    results: dict[str, dict] = {}
    for name, folder in FEWSHOT_FOLDERS.items():
        root = args.data / folder
        if not root.is_dir():
            print(f"skipped {name}: no folder {root}")
            continue
        classes = sorted(d for d in root.iterdir() if d.is_dir())
        paths = []
        for cls in classes:  # the same seeded pool of images a class every run
            files = sorted(cls.glob("*.jpg"))
            if len(files) < args.per_class:
                raise SystemExit(f"{cls} has {len(files)} images, fewer than --per-class {args.per_class}")
            paths += random.Random(f"{name}-{cls.name}").sample(files, args.per_class)
        images = load_images(paths, args.fewshot_size)  # (C*P, 3, S, S)
        features = {"pixels": images.flatten(1)}
        for tower_name, tower in towers.items():
            features[tower_name] = run_batches(tower, images, f"{name} {tower_name}")  # (C*P, 1280)
        ways = min(args.ways, len(classes))
        episodes = sample_episodes(len(classes), args.per_class, ways, args.shots, args.queries, args.episodes,
                                   args.seed)
        results[name] = {"ways": ways, "classes": len(classes), "images": len(paths)}
        for feature_name, rows in features.items():
            metric = "euclidean" if feature_name == "pixels" else "cosine"
            results[name][feature_name] = nearest_class_mean(rows, episodes, ways, metric)
    return results


# ------------------------------------------------------------------ report
def report(classifier: dict, fewshot: dict, args, header: list[str]) -> str:
    """Markdown tables of both checks."""
    lines = [*header, "", f"## (a) ImageNet classifier: top-1 agreement under a flip and {args.sizes[0]} vs "
             f"{args.sizes[1]} px", "",
             "| images | model | n | flip agreement | size agreement | mean max prob | distinct top-1 "
             "| top-5 hit rate |",
             "|---|---|---|---|---|---|---|---|"]
    for image_set, by_model in classifier.items():
        for model, s in by_model.items():
            if isinstance(s, dict) and "flip_agreement" in s:
                hit = f"{s['top5_hit_rate']:.1%}" if "top5_hit_rate" in s else "-"
                lines.append(f"| {image_set} | {model} | {s['images']} | {s['flip_agreement']:.1%} | "
                             f"{s['size_agreement']:.1%} | {s['mean_max_prob']:.3f} | {s['distinct_top1']} | {hit} |")
    if "cifar10" in classifier:
        names = sorted(CIFAR_TO_IMAGENET)
        lines += ["", "CIFAR-10 top-5 hit rate by class:", "", "| model | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for m in classifier["cifar10"]:
            by_class = classifier["cifar10"][m]["hit_rate_by_class"]
            lines.append(f"| {m} | " + " | ".join(f"{by_class[c]:.0%}" for c in sorted(CIFAR_TO_IMAGENET)) + " |")
    if "coco" in classifier:
        from timm.data import ImageNetInfo

        info, coco = ImageNetInfo(), classifier["coco"]
        examples = ", ".join(f"{f}: {info.index_to_description(i).split(',')[0]}"
                             for f, i in list(zip(coco["files"], coco["pretrained"]["top1"], strict=True))[:8])
        lines += ["", f"COCO top-1 of the pretrained classifier (first 8): {examples}"]
    lines += ["", f"## (b) nearest class mean, {args.shots}-shot {args.queries}-query, {args.episodes} episodes, "
              f"{args.fewshot_size} px (accuracy, 95% interval)", "",
              "| folder | ways | pool | pretrained | random init | pixels |", "|---|---|---|---|---|---|"]
    for folder, r in fewshot.items():
        cells = " | ".join(f"{100 * r[k][0]:.1f} ± {100 * r[k][1]:.1f}" for k in ("pretrained", "random", "pixels"))
        lines.append(f"| {folder} | {r['ways']} | {r['classes']}x{args.per_class} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder of the real data sets")
    parser.add_argument("--variant", type=int, default=0, help="EfficientNet-Lite variant: 0, 1 or 2")
    parser.add_argument("--sizes", type=int, nargs=2, default=(224, 192), help="classifier input size and another")
    parser.add_argument("--cifar-per-class", type=int, default=10, help="CIFAR-10 images a class for (a)")
    parser.add_argument("--coco", type=int, default=40, help="COCO val2017 images for (a)")
    parser.add_argument("--fewshot-size", type=int, default=128, help="image and tower side for (b)")
    parser.add_argument("--per-class", type=int, default=25, help="images a class in the pool episodes draw from")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for check_pretrained.{json,md}")
    args = parser.parse_args(argv)
    args.sizes = tuple(args.sizes)
    start = time.time()

    classifiers = {"pretrained": efficientnet_lite_model(args.variant).eval()}
    torch.manual_seed(args.seed)
    classifiers["random"] = efficientnet_lite_model(args.variant, random_init=True).eval()
    towers = {"pretrained": efficientnet_lite_tower(args.variant, image_size=args.fewshot_size).eval()}
    torch.manual_seed(args.seed)
    towers["random"] = efficientnet_lite_tower(args.variant, image_size=args.fewshot_size, random_init=True).eval()
    for module in (*classifiers.values(), *towers.values()):
        module.to(memory_format=torch.channels_last)
    header = [f"# EfficientNet-Lite{args.variant}: pretrained (package weights, digest "
              f"{weights_digest(towers['pretrained'])[:16]}) vs random init (seed {args.seed}); data {args.data}"]

    classifier = check_classifier(args, classifiers)
    print(f"(a) done in {time.time() - start:.0f} s")
    fewshot = check_fewshot(args, towers)
    header.append(f"Wall time {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads.")
    text = report(classifier, fewshot, args, header)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_pretrained.md").write_text(text + "\n")
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "classifier": classifier, "fewshot": fewshot}
        (args.out / "check_pretrained.json").write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out / 'check_pretrained.md'} and .json")


if __name__ == "__main__":
    main()
