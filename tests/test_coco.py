"""dataset=coco end to end: class masks made from COCO-format annotations, short runs on Xception-65 and of CISC-R."""
import json
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from semiseg.data import COCO_CATEGORY_IDS, COCO_CLASSES, dataset_spec
from semiseg.train import run, train


def write_coco_split(root, split, images, anns):
    "Random-noise JPEGs `images` {stem: (h, w)} and their instance annotations `anns` (ids and bbox filled in)."
    (root / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / f"{stem}.jpg")
    js = dict(images=[dict(id=int(s), file_name=f"{s}.jpg", height=h, width=w) for s, (h, w) in images.items()],
              annotations=[dict(id=k + 1, bbox=[0, 0, 1, 1], **a) for k, a in enumerate(anns)],
              categories=[dict(id=c, name=n) for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])])
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(js))


def uncompressed_rle(m):
    "COCO's uncompressed RLE of a binary mask: run lengths in column-major order, the first one of zeros."
    flat = m.flatten(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
    return dict(counts=([0] if flat[0] else []) + runs.tolist(), size=list(m.shape))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    "Four training and two validation images of 32 x 32; image 1 holds a dog, a crowd of kites and a cup."
    root = tmp_path_factory.mktemp("coco")
    crowd = np.zeros((32, 32), np.uint8, order="F")
    crowd[:8] = 1                                                # rows 0..7: a crowd of kites (compressed RLE)
    rle = mask_utils.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    dog = [[0, 4, 16, 4, 16, 20, 0, 20]]                         # pixels x 0..15, y 4..19
    cup = np.zeros((32, 32), np.uint8)
    cup[10:14, 20:22] = 1                                        # rows 10..13, columns 20, 21 (uncompressed RLE)
    train_anns = [dict(image_id=1, category_id=18, segmentation=dog, area=256, iscrowd=0),
                  dict(image_id=1, category_id=38, segmentation=rle, area=256, iscrowd=1),
                  dict(image_id=1, category_id=47, segmentation=uncompressed_rle(cup), area=8, iscrowd=0),
                  *[dict(image_id=i, category_id=1, segmentation=[[8, 8, 24, 8, 24, 24, 8, 24]], area=256, iscrowd=0)
                    for i in (2, 3, 4)]]
    write_coco_split(root, "train2017", {f"{i:012d}": (32, 32) for i in (1, 2, 3, 4)}, train_anns)
    write_coco_split(root, "val2017", {f"{i:012d}": (32, 32) for i in (5, 6)},
                [dict(image_id=5, category_id=1, segmentation=[[8, 8, 24, 8, 24, 24, 8, 24]], area=256, iscrowd=0)])
    return root


def test_coco_masks_have_the_protocols_classes(coco_root):
    spec = dataset_spec("coco", coco_root)
    items = spec.items("train")
    assert [i for i, _, _ in items] == [f"{i:012d}" for i in (1, 2, 3, 4)]
    mask = spec.dataset(items)[0]["mask"].numpy()
    expected = np.zeros((32, 32), np.int64)
    expected[:8] = 255                                           # crowd: ignored
    expected[4:20, :16] = 17                                     # dog (category 18 is class 17)
    expected[10:14, 20:22] = 42                                  # cup (category 47 is class 42)
    assert (mask == expected).all()
    assert (COCO_CLASSES[17], COCO_CLASSES[42]) == ("dog", "cup")
    assert (coco_root / "masks" / "train2017.txt").read_text().split() == [i for i, _, _ in items]


def test_short_run_on_coco_with_xception65(coco_root, tmp_path):
    res = train(dataset="coco", data_root=str(coco_root), backbone="xception65", pretrained="none", output_stride=16,
                labeled=2, batch_size=2, crop=32, iters=2, workers=0, out_dir=str(tmp_path / "run"))
    assert (res["dataset"], res["n_labeled"], len(res["per_class_iou"])) == ("coco", 2, 81)
    assert res["per_class_iou"][1] is not None and res["per_class_iou"][17] is None   # person in val; dog is not


def test_ciscr_pipeline_runs_on_coco(coco_root, tmp_path):
    "CISC-R's three stages on COCO's 81 classes (the tiny backbone), each stage with its TensorBoard log."
    res = run(dict(method="ciscr", dataset="coco", data_root=str(coco_root), labeled=2, batch_size=2, batch_size_u=2,
                   crop=32, iters=2, workers=0, out_dir=str(tmp_path / "run"), **{"stage1.iters": 2, "stage2.iters": 2}))
    assert (res["dataset"], res["stage_iters"], len(res["per_class_iou"])) == ("coco", [2, 2, 2], 81)
    assert all((tmp_path / "run" / s / "tb").is_dir() for s in ("stage1", "stage2", "stage3"))
