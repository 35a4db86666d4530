"""Image-folder indexes: the real sample, the Tiny-ImageNet layout, one line for each bad layout,
and the cache that spares a listing of every file at every start."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from hist import data
from hist.data import folders
from hist.errors import HistError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Caches of read-only sets go under HIST_CACHE: keep them out of the user's ~/.cache."""
    monkeypatch.setenv("HIST_CACHE", str(tmp_path / "cache"))


def image(path, size=(12, 10), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def tree(root, layout):
    """{"train/a": 2, ...}: class folders with that many images (alternately PNG and JPEG)."""
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image(root / folder / f"img{i}.{'png' if i % 2 else 'JPEG'}", seed=i)
    return root


def age(root, seconds=100):
    """Back-date every folder, as if the set had been unpacked long ago (a folder changed within
    the last seconds is not trusted to a cache: its mtime may not move on a second change)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def test_the_real_sample_is_indexed_in_sorted_class_folders(image_sample):
    train = data.index_folder("imagewoof", image_sample, "train")
    val = data.index_folder("imagewoof", image_sample, "val")
    classes = sorted(p.name for p in (image_sample / "train").iterdir())
    assert train.classes == val.classes == tuple(classes) and len(classes) == 10
    assert len(train) == 600 and len(val) == 200 and train.labels.dtype == np.int64
    assert train.root == image_sample.absolute() / "train"
    for split, per_class in ((train, 60), (val, 20)):
        assert np.bincount(split.labels).tolist() == [per_class] * 10
        for f, label in zip(split.files, split.labels):
            assert f.split("/")[0] == classes[label] and (split.root / f).is_file()
    assert list(train.files[:60]) == sorted(
        f"{classes[0]}/{p.name}" for p in (image_sample / "train" / classes[0]).iterdir()
    )
    assert data.num_classes("imagewoof") == 10 and data.num_classes("imagefolder", val) == 10


def test_generic_folders_take_png_and_jpeg_in_any_case_and_skip_the_rest(tmp_path):
    root = tree(tmp_path / "set", {"train/b": 2, "train/a": 1, "val/b": 1})
    (root / "train/a/x.JPG").write_bytes((root / "train/a/img0.JPEG").read_bytes())
    (root / "train/a/notes.txt").write_text("not an image")
    (root / "train/a/._img0.JPEG").write_bytes(b"macOS resource fork")
    (root / "train/.DS_Store").write_bytes(b"")
    train = data.index_folder("imagefolder", root, "train")
    assert train.classes == ("a", "b") and train.files == ("a/img0.JPEG", "a/x.JPG", "b/img0.JPEG", "b/img1.png")
    assert train.labels.tolist() == [0, 0, 1, 1]
    val = data.index_folder("imagefolder", root, "val")
    assert val.classes == ("a", "b") and val.files == ("b/img0.JPEG",) and val.labels.tolist() == [1]
    assert data.num_classes("imagefolder", train) == 2


BAD_LAYOUTS = {
    "missing val": ({"train/a": 1}, "imagefolder", "train", r"missing folder .*set/val"),
    "empty class": (
        {"train/a": 1, "train/b": 0, "val/a": 1},
        "imagefolder",
        "train",
        r"class folder .*set/train/b holds no images",
    ),
    "no classes": ({"train": 0, "val/a": 1}, "imagefolder", "train", r"set/train has no class folders"),
    "val class not a train class": (
        {"train/a": 1, "val/a": 1, "val/zebra": 1},
        "imagefolder",
        "val",
        r"set/val.*set/val/zebra.*mislabelled",
    ),
    "empty val class": ({"train/a": 1, "val/a": 0}, "imagefolder", "val", r"class folder .*set/val/a holds no images"),
    "wrong class count": (
        {"train/a": 1, "train/b": 1, "val/a": 1},
        "imagenette",
        "train",
        r"train has 2 classes but imagenette has 10.*imagefolder",
    ),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS, ids=list(BAD_LAYOUTS))
def test_bad_layouts_are_one_line_naming_the_path(tmp_path, case):
    layout, dataset, split, message = BAD_LAYOUTS[case]
    root = tree(tmp_path / "set", layout)
    with pytest.raises(HistError, match=message) as e:
        data.index_folder(dataset, root, split)
    assert "\n" not in str(e.value)


def test_a_missing_data_folder_and_an_unknown_name_are_one_line(tmp_path):
    with pytest.raises(HistError, match=r"data folder .*nowhere does not exist"):
        data.index_folder("imagenet", tmp_path / "nowhere", "train")
    with pytest.raises(HistError, match="unknown image-folder dataset 'imagenet22k'"):
        data.index_folder("imagenet22k", tmp_path, "train")


def test_the_index_is_cached_and_the_cache_trusted_without_a_listing(tmp_path, monkeypatch):
    root = tree(tmp_path / "set", {"train/a": 2, "train/b": 1, "val/a": 1})
    age(root)
    first = data.index_folder("imagefolder", root, "train")
    assert (root / ".hist-index-folders-train.json").is_file()

    def no_listing(path):
        raise AssertionError(f"listed {path}")

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", no_listing)
        m.setattr(os, "listdir", no_listing)
        again = data.index_folder("imagefolder", root, "train")
    assert again.files == first.files and again.labels.tolist() == first.labels.tolist()

    image(root / "train/b/new.png")  # changes the mtime of train/b
    rebuilt = data.index_folder("imagefolder", root, "train")
    assert "b/new.png" in rebuilt.files and len(rebuilt) == 4
    (root / "train/a/img1.png").unlink()
    assert "a/img1.png" not in data.index_folder("imagefolder", root, "train").files


def test_a_new_class_folder_invalidates_both_splits(tmp_path):
    root = tree(tmp_path / "set", {"train/b": 1, "val/b": 1})
    age(root)
    assert data.index_folder("imagefolder", root, "val").labels.tolist() == [0]
    tree(root, {"train/a": 1})
    assert data.index_folder("imagefolder", root, "val").labels.tolist() == [1]


def test_a_damaged_or_foreign_cache_is_rebuilt_silently(tmp_path):
    root = tree(tmp_path / "set", {"train/a": 2, "val/a": 1})
    age(root)
    cache = root / ".hist-index-folders-train.json"
    for blob in (
        "{not json",
        '{"format": 1}',
        '{"format": 1, "kind": "folders", "split": "train", "signature": {}}',
        "[]",
    ):
        cache.write_text(blob)
        assert data.index_folder("imagefolder", root, "train").files == ("a/img0.JPEG", "a/img1.png")
    text = cache.read_text()
    cache.write_text(text.replace('"labels":[0,0]', '"labels":[0,7]'))  # a label out of range
    assert data.index_folder("imagefolder", root, "train").labels.tolist() == [0, 0]


def test_a_recently_changed_folder_is_not_cached(tmp_path):
    """Its mtime might not move again within the file system's resolution: listing is safer."""
    root = tree(tmp_path / "set", {"train/a": 1, "val/a": 1})
    data.index_folder("imagefolder", root, "train")
    assert not (root / ".hist-index-folders-train.json").exists()


def test_a_read_only_set_is_cached_under_hist_cache(tmp_path):
    root = tree(tmp_path / "set", {"train/a": 1, "val/a": 1})
    age(root)
    root.chmod(0o555)
    try:
        data.index_folder("imagefolder", root, "val")
        assert not list(root.glob(".hist-index*"))
        assert len(list((tmp_path / "cache" / "index").glob("*-folders-val.json"))) == 1
    finally:
        root.chmod(0o755)


def tiny_imagenet(root, wnids, val, extra=(), write_wnids=True):
    """A Tiny-ImageNet tree: one image per class, `val` = [(file, wnid)] annotated."""
    for wnid in (*wnids, *extra):
        image(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", size=(8, 8))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    for name, _ in val:
        image(root / "val" / "images" / name, size=(8, 8))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t7\t7\n" for n, w in val))
    if write_wnids:
        (root / "wnids.txt").write_text("\n".join((*wnids, *extra)))
    return root


WNIDS = [f"n{i:08d}" for i in range(200, 0, -1)]  # unsorted, as in the real wnids.txt


@pytest.mark.parametrize("write_wnids", [True, False])
def test_tiny_imagenet_layout_leaves_out_the_two_extra_classes(tmp_path, write_wnids):
    extra = sorted(folders.TINY_IMAGENET_EXTRA)
    val = [("val_0.JPEG", WNIDS[5]), ("val_1.JPEG", extra[0]), ("val_2.JPEG", WNIDS[0])]
    root = tiny_imagenet(tmp_path / "tiny", WNIDS, val, extra=extra, write_wnids=write_wnids)
    train = data.index_folder("tiny-imagenet", root, "train")
    assert train.classes == tuple(sorted(WNIDS)) and len(train) == 200
    assert train.files[0] == f"{sorted(WNIDS)[0]}/images/{sorted(WNIDS)[0]}_0.JPEG"
    assert [train.classes[label] for label in train.labels] == [f.split("/")[0] for f in train.files]
    test = data.index_folder("tiny-imagenet", root, "val")
    assert test.files == ("images/val_0.JPEG", "images/val_2.JPEG") and test.root == root.absolute() / "val"
    assert [test.classes[label] for label in test.labels] == [WNIDS[5], WNIDS[0]]
    assert data.num_classes("tiny-imagenet") == 200


def test_tiny_imagenet_annotations_naming_an_unknown_class_or_a_missing_file(tmp_path):
    root = tiny_imagenet(tmp_path / "tiny", WNIDS, [("val_0.JPEG", WNIDS[1])])
    notes = root / "val" / "val_annotations.txt"
    notes.write_text(f"val_0.JPEG\t{WNIDS[1]}\t0\t0\t7\t7\nval_0.JPEG\tn99999999\t0\t0\t7\t7\n")
    with pytest.raises(HistError, match=r"val_annotations.txt line 2 labels val_0.JPEG with n99999999, which is not"):
        data.index_folder("tiny-imagenet", root, "val")
    notes.write_text(f"val_0.JPEG\t{WNIDS[1]}\t0\t0\t7\t7\nval_9.JPEG\t{WNIDS[1]}\t0\t0\t7\t7\n")
    with pytest.raises(HistError, match=r"line 2 names .*val/images/val_9.JPEG, which is missing"):
        data.index_folder("tiny-imagenet", root, "val")
    (root / "wnids.txt").write_text("\n".join(WNIDS[:-1] + ["n77777777"]))
    with pytest.raises(HistError, match=r"missing folder .*train/n77777777/images of class n77777777"):
        data.index_folder("tiny-imagenet", root, "train")


def test_every_folder_dataset_has_statistics_and_a_class_count():
    assert data.FOLDER_DATASETS == ("imagefolder", "imagenet", "imagenette", "imagewoof", "tiny-imagenet")
    for name in data.FOLDER_DATASETS:
        assert data.STATS[name] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert {k: data.NUM_CLASSES[k] for k in data.FOLDER_DATASETS if k != "imagefolder"} == {
        "imagenet": 1000,
        "imagenette": 10,
        "imagewoof": 10,
        "tiny-imagenet": 200,
    }
    with pytest.raises(HistError, match="imagefolder"):
        data.num_classes("imagefolder")
