"""Shard converters: round trips through real shards, meta-splits, atomic writes and bad input."""
from __future__ import annotations

import csv
import io
import json
import logging

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from metacontrastive.data import prepare, readers
from metacontrastive.data.manifest import read_manifest, split_urls
from metacontrastive.data.prepare import main, write_domain
from metacontrastive.data.readers import read_captions, read_coco, read_imagefolder, read_npz
from metacontrastive.data.shards import decode_record


def _image(path, seed, size=(20, 16), mode="RGB"):
    """Write a random image of ``size`` (W, H) to ``path`` (format from the suffix)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _folder(root, classes=("ant", "bee", "cat", "dog", "eel"), per_class=4, suffix=".png"):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"{i}{suffix}", seed=100 * c + i)
    return root


def _samples(out, domain):
    """Every raw sample of a domain, read from its tars with WebDataset, keyed by split."""
    manifest = read_manifest(domain, out)
    found = {}
    for split in manifest["splits"]:
        pipe = wds.DataPipeline(wds.SimpleShardList(split_urls(out, domain, split, manifest)), wds.tarfile_to_samples())
        found[split] = list(pipe)
    return manifest, found


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def test_imagefolder_round_trip_resizes_png_and_fills_templates(tmp_path):
    src, out = _folder(tmp_path / "src"), tmp_path / "shards"
    main(["imagefolder", str(src), "--domain", "nat", "--out", str(out), "--size", "8",
          "--template", "a photo of a {label}", "--maxcount", "3"])
    manifest, found = _samples(out, "nat")
    assert manifest["labelled"] and manifest["classes"] == ["ant", "bee", "cat", "dog", "eel"]
    assert sum(len(s) for s in found.values()) == 20
    assert len(manifest["splits"]["train"]["shards"]) == 4  # 12 samples, 3 per shard
    for split, samples in found.items():
        for sample in samples:
            meta = json.loads(sample["json"])
            name = manifest["classes"][int(sample["cls"])]
            assert meta["label"] == name and meta["split"] == split and meta["domain"] == "nat"
            assert sample["txt"].decode() == f"a photo of a {name}"
            expected = Image.open(src / meta["origin"]).resize((10, 8), Image.BICUBIC)  # shorter side 16 -> 8
            np.testing.assert_array_equal(_decode(sample["png"]), np.asarray(expected))


def test_decode_record_reads_converted_shards(tmp_path):
    src = tmp_path / "src"
    for c, name in enumerate(("a", "b", "c")):
        for i in range(2):
            _image(src / name / f"{i}.png", seed=10 * c + i, size=(8, 8))
    out = tmp_path / "shards"
    write_domain(read_imagefolder(src), "d", out, source="test")
    manifest = read_manifest("d", out)
    (name,) = manifest["splits"]["train"]["classes"]  # 3 classes: one per split
    records = [decode_record(sample, image_size=8) for sample in _samples(out, "d")[1]["train"]]
    assert [r.label for r in records] == [manifest["classes"].index(name)] * 2
    assert {r.text for r in records} == {f"a photo of a {name}"}
    originals = [np.asarray(Image.open(src / name / f"{i}.png")) for i in range(2)]
    for record in records:
        assert any(np.array_equal(record.image.permute(1, 2, 0).numpy(), o) for o in originals)  # (H, W, 3)


def test_split_folders_are_merged_and_meta_split_is_by_class(tmp_path):
    src = tmp_path / "src"
    _folder(src / "Training", per_class=3)
    _folder(src / "Testing", classes=("ant", "bee", "cat", "dog", "eel"), per_class=1, suffix=".jpg")
    items = read_imagefolder(src)
    assert sorted({i.label for i in items}) == ["ant", "bee", "cat", "dog", "eel"] and len(items) == 20
    summary = write_domain(items, "mri", tmp_path / "shards", source="test", seed=3)
    manifest = read_manifest("mri", tmp_path / "shards")
    per_split = {s: set(info["classes"]) for s, info in manifest["splits"].items()}
    assert [len(per_split[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert set.union(*per_split.values()) == set(manifest["classes"])
    assert all(n == 4 for info in manifest["splits"].values() for n in info["counts"].values())
    assert summary.samples == {"train": 12, "val": 4, "test": 4} and summary.classes == {"train": 3, "val": 1, "test": 1}
    again = write_domain(items, "mri", tmp_path / "shards", source="test", seed=3, overwrite=True)
    assert read_manifest("mri", tmp_path / "shards") == manifest and again.samples == summary.samples


def test_explicit_class_lists(tmp_path):
    src, out = _folder(tmp_path / "src"), tmp_path / "shards"
    main(["imagefolder", str(src), "--domain", "d", "--out", str(out), "--train-classes", "ant,cat", "--val-classes", "eel"])
    manifest = read_manifest("d", out)
    assert manifest["classes"] == ["ant", "cat", "eel"]
    assert {s: info["classes"] for s, info in manifest["splits"].items()} == {"train": ["ant", "cat"], "val": ["eel"]}
    items = read_imagefolder(src)
    with pytest.raises(ValueError, match="both the train and the val list"):
        write_domain(items, "e", out, source="t", class_lists={"train": ["ant"], "val": ["ant"]})
    with pytest.raises(ValueError, match=r"unknown classes \['yak'\]"):
        write_domain(items, "e", out, source="t", class_lists={"test": ["yak"]})
    with pytest.raises(ValueError, match="leaves a split empty"):
        write_domain(items[:8], "e", out, source="t")  # two classes cannot fill three splits


def test_test_only_writes_an_evaluation_only_domain(tmp_path):
    src, out = _folder(tmp_path / "src"), tmp_path / "shards"
    main(["imagefolder", str(src), "--domain", "held", "--out", str(out), "--test-only"])
    manifest = read_manifest("held", out)
    assert list(manifest["splits"]) == ["test"]
    assert manifest["splits"]["test"]["classes"] == ["ant", "bee", "cat", "dog", "eel"]
    with pytest.raises(SystemExit, match="leave out --train/--val/--test-classes"):
        main(["imagefolder", str(src), "--domain", "h2", "--out", str(out), "--test-only", "--train-classes", "ant"])


def test_rerun_refuses_without_overwrite(tmp_path):
    src, out = _folder(tmp_path / "src"), tmp_path / "shards"
    args = ["imagefolder", str(src), "--domain", "d", "--out", str(out)]
    main(args)
    with pytest.raises(SystemExit, match="pass --overwrite"):
        main(args)
    main(args + ["--overwrite", "--template", "a {label}"])
    assert read_manifest("d", out)["templates"] == ["a {label}"]


def test_interrupted_write_leaves_old_shards_and_no_partial_folder(tmp_path, monkeypatch):
    src, out = _folder(tmp_path / "src"), tmp_path / "shards"
    items = read_imagefolder(src)
    write_domain(items, "d", out, source="first")
    before = sorted(p.name for p in out.iterdir())
    load = prepare._load_image

    def fail_at(n):
        calls = []

        def load_or_fail(*args):
            calls.append(args)
            if len(calls) == n:
                raise KeyboardInterrupt  # as if Ctrl-C hit mid-way
            return load(*args)
        return load_or_fail

    monkeypatch.setattr(prepare, "_load_image", fail_at(7))
    with pytest.raises(KeyboardInterrupt):
        write_domain(items, "d", out, source="second", overwrite=True)
    assert read_manifest("d", out)["source"] == "first" and sorted(p.name for p in out.iterdir()) == before
    monkeypatch.setattr(prepare, "_load_image", fail_at(7))
    with pytest.raises(KeyboardInterrupt):
        write_domain(items, "fresh", out, source="second")
    assert sorted(p.name for p in out.iterdir()) == before  # no fresh/, no .fresh.partial-*


def test_jpeg_sources_pass_through_unchanged(tmp_path):
    src = _folder(tmp_path / "src", suffix=".jpg")
    write_domain(read_imagefolder(src), "d", tmp_path / "shards", source="t", image_format="jpg")
    _, found = _samples(tmp_path / "shards", "d")
    for sample in found["train"]:
        assert sample["jpg"] == (src / json.loads(sample["json"])["origin"]).read_bytes()


def test_captions_csv_caption_only_split_by_image(tmp_path):
    rows = [{"image": f"img/{i}.png", "caption": f"picture number {i}"} for i in range(10)]
    rows.append({"image": "img/3.png", "caption": "another caption of three"})
    for i in range(10):
        _image(tmp_path / "img" / f"{i}.png", seed=i)
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    main(["captions", str(tmp_path / "pairs.csv"), "--domain", "web", "--out", str(tmp_path / "shards")])
    manifest, found = _samples(tmp_path / "shards", "web")
    assert not manifest["labelled"] and manifest["classes"] == [] and manifest["templates"] == []
    assert {s: info["num_samples"] for s, info in manifest["splits"].items()} == {"train": 8, "val": 1, "test": 1}
    for sample in (s for samples in found.values() for s in samples):
        meta = json.loads(sample["json"])
        number = int(meta["origin"].split("/")[1].split(".")[0])
        assert "cls" not in sample and meta["label"] is None
        assert sample["txt"].decode() == f"picture number {number}"
        assert meta.get("captions", [None])[-1] == ("another caption of three" if number == 3 else None)
        np.testing.assert_array_equal(_decode(sample["png"]), np.asarray(Image.open(tmp_path / meta["origin"])))


def test_captions_jsonl_with_labels_fills_empty_captions(tmp_path):
    lines = []
    for c, name in enumerate(("glioma", "meningioma", "notumor")):
        for i in range(2):
            _image(tmp_path / "scans" / f"{name}{i}.png", seed=c * 10 + i, mode="L")
            lines.append({"path": f"scans/{name}{i}.png", "text": "" if i else f"scan of {name}", "y": name})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    items = read_captions(tmp_path / "data.jsonl", "path", "text", "y", labels={"notumor": "no tumor"})
    write_domain(items, "med", tmp_path / "shards", source="t", templates=["an MRI showing {label}"])
    manifest, found = _samples(tmp_path / "shards", "med")
    assert manifest["classes"] == ["glioma", "meningioma", "no tumor"]
    for sample in (s for samples in found.values() for s in samples):
        meta = json.loads(sample["json"])
        name = manifest["classes"][int(sample["cls"])]
        expected = f"an MRI showing {name}" if meta["origin"].endswith("1.png") else f"scan of {meta['origin'][6:-5]}"
        assert sample["txt"].decode() == expected
        assert _decode(sample["png"]).ndim == 2  # greyscale stays one channel


def _coco(tmp_path, n=10):
    images = [{"id": 100 + i, "file_name": f"{i:03d}.jpg"} for i in range(n)]
    captions = [{"id": 2 * i + k, "image_id": 100 + i, "caption": f" caption {k} of {i} "} for i in range(n - 1) for k in range(2)]
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    instances = [{"id": i, "image_id": 100 + i // 3, "category_id": 1 + (i % 3 == 0)} for i in range(3 * (n - 2))]
    for image in images:
        _image(tmp_path / "imgs" / image["file_name"], seed=image["id"])
    (tmp_path / "cap.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (tmp_path / "ins.json").write_text(json.dumps({"images": images, "annotations": instances, "categories": categories}))
    return tmp_path / "cap.json", tmp_path / "imgs", tmp_path / "ins.json"


def test_coco_caption_only_and_with_instances(tmp_path, caplog):
    cap, imgs, ins = _coco(tmp_path)
    with caplog.at_level(logging.WARNING):
        items = read_coco([cap], [imgs])
    assert len(items) == 9 and "1 images without captions" in caplog.text
    assert items[0].captions == ["caption 0 of 0", "caption 1 of 0"] and items[0].label is None
    summary = write_domain(items, "coco", tmp_path / "shards", source="t", image_format="jpg")
    assert summary.samples == {"train": 7, "val": 1, "test": 1} and summary.classes == {"train": 0, "val": 0, "test": 0}
    labelled = read_coco([cap], [imgs], [ins])
    assert len(labelled) == 8 and {i.label for i in labelled} == {"person"}  # two persons beat one dog
    with pytest.raises(ValueError, match="one --images folder"):
        read_coco([cap, cap], [imgs])
    with pytest.raises(ValueError, match="not a COCO instances file"):
        read_coco([cap], [imgs], [cap])


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 6, 6), dtype=np.uint8) for s, n in (("train", 12), ("val", 3), ("test", 3))}
    arrays |= {f"{s}_labels": (np.arange(len(arrays[f"{s}_images"])) % 3).reshape(-1, 1) for s in ("train", "val", "test")}
    np.savez(tmp_path / "tiny.npz", **arrays)
    (tmp_path / "labels.json").write_text(json.dumps(["adipose", "background", "debris"]))
    out = tmp_path / "shards"
    main(["npz", str(tmp_path / "tiny.npz"), "--domain", "path", "--out", str(out), "--labels", str(tmp_path / "labels.json"),
          "--template", "a tissue slide of {label}"])
    manifest, found = _samples(out, "path")
    assert sorted(manifest["classes"]) == ["adipose", "background", "debris"]
    assert [info["num_samples"] for info in manifest["splits"].values()] == [6, 6, 6]
    for sample in (s for samples in found.values() for s in samples):
        split, index = json.loads(sample["json"])["origin"].split(":")[1].split("/")
        np.testing.assert_array_equal(_decode(sample["png"]), arrays[f"{split}_images"][int(index)])
        assert manifest["classes"][int(sample["cls"])] == ["adipose", "background", "debris"][int(index) % 3]
    with pytest.raises(SystemExit, match="npz needs --labels"):
        main(["npz", str(tmp_path / "tiny.npz"), "--domain", "x", "--out", str(out)])


def test_sixteen_bit_images_are_stretched_to_eight_bits(tmp_path):
    array = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "scan.png")
    image = prepare._load_image(readers.Item("scan.png", path=tmp_path / "scan.png"), None, "png")
    np.testing.assert_array_equal(np.asarray(image), [[0, 64], [128, 255]])


# ---------------------------------------------------------------- bad input
def test_missing_root_and_empty_class_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_imagefolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folders"):
        read_imagefolder(tmp_path)
    src = _folder(tmp_path / "src")
    (src / "yak").mkdir()
    (src / "yak" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="class folder .*yak holds no images"):
        read_imagefolder(src)
    with pytest.raises(SystemExit, match="prepare imagefolder: error: .*holds no images"):
        main(["imagefolder", str(src), "--domain", "d", "--out", str(tmp_path / "shards")])


def test_unreadable_images_are_skipped_named_or_raise_when_strict(tmp_path, caplog, capsys):
    src = _folder(tmp_path / "src")
    (src / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _image(src / "cat" / "cut.jpg", seed=1).write_bytes((src / "cat" / "cut.jpg").read_bytes()[:200])
    items = read_imagefolder(src)
    with caplog.at_level(logging.WARNING):
        summary = write_domain(items, "d", tmp_path / "shards", source="t")
    assert sorted(line.split("\t")[0] for line in summary.skipped) == ["bee/broken.png", "cat/cut.jpg"]
    assert sum(summary.samples.values()) == 20
    assert "skipped 2 unreadable images" in caplog.text and "bee/broken.png" in caplog.text
    listed = (tmp_path / "shards" / "d" / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == ["bee/broken.png", "cat/cut.jpg"]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in listed)  # each with its error
    main(["imagefolder", str(src), "--domain", "f", "--out", str(tmp_path / "shards")])
    assert "skipped 2, listed in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cannot read image"):
        write_domain(items, "e", tmp_path / "shards", source="t", strict=True)
    assert not (tmp_path / "shards" / "e").exists()


def test_captions_file_errors(tmp_path):
    (tmp_path / "a.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match=r"line 2 lacks the columns \['image', 'caption'\] \(it has \['path', 'text'\]\).*--image-column"):
        read_captions(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("image,caption\nx.png,\n")
    with pytest.raises(ValueError, match="line 2 has an empty image or caption"):
        read_captions(tmp_path / "b.csv")
    (tmp_path / "c.txt").write_text("image,caption\n")
    with pytest.raises(ValueError, match=r"must end in .csv or .jsonl"):
        read_captions(tmp_path / "c.txt")
    with pytest.raises(FileNotFoundError, match="captions file .* does not exist"):
        read_captions(tmp_path / "missing.csv")


def test_npz_errors(tmp_path):
    images = np.zeros((2, 4, 4), np.uint8)
    np.savez(tmp_path / "a.npz", train_images=images)
    with pytest.raises(ValueError, match=r"lacks \['train_labels'\]"):
        read_npz(tmp_path / "a.npz", {"0": "x"})
    np.savez(tmp_path / "b.npz", imgs=images)
    with pytest.raises(ValueError, match="has no <split>_images"):
        read_npz(tmp_path / "b.npz", {"0": "x"})
    np.savez(tmp_path / "c.npz", train_images=images, train_labels=np.array([0, 2]))
    with pytest.raises(ValueError, match=r"names no class for label values \['2'\]"):
        read_npz(tmp_path / "c.npz", {"0": "x"})
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="multi-label"):
        read_npz(tmp_path / "d.npz", {"0": "x"})
    with pytest.raises(SystemExit):
        main(["npz", str(tmp_path / "c.npz"), "--domain", "d", "--labels", "0:x"])


def test_bad_options(tmp_path):
    items = read_imagefolder(_folder(tmp_path / "src"))
    with pytest.raises(ValueError, match="has no {label} field"):
        write_domain(items, "d", tmp_path, source="t", templates=["a photo"])
    with pytest.raises(ValueError, match="may only use the field"):
        write_domain(items, "d", tmp_path, source="t", templates=["a {label} in {place}"])
    with pytest.raises(ValueError, match="letters, digits"):
        write_domain(items, "my.domain", tmp_path, source="t")
    with pytest.raises(ValueError, match="no images to write for domain 'empty'"):
        write_domain([], "empty", tmp_path, source="t")
    with pytest.raises(ValueError, match="caption-only data has no classes"):
        write_domain([readers.Item("x.png", captions=["x"])] * 3, "d", tmp_path, source="t", class_lists={"train": ["a"]})


def test_synthetic_still_writes(tmp_path):
    main(["synthetic", "--domain", "medical", "--out", str(tmp_path), "--per-class", "2", "--size", "8"])
    manifest = read_manifest("medical", tmp_path)
    assert manifest["labelled"] and sum(info["num_samples"] for info in manifest["splits"].values()) == 50
