"""A folder dataset whose masks are COLOUR images (decoded with the palette of classes.yaml) works everywhere a run reads
its dataset again: prediction with a finished run, pseudo-label quality, and CISC-R's labeled pool."""
import numpy as np
import pytest
import yaml
from PIL import Image
from semiseg import data as D


@pytest.fixture(scope="module")
def colour_folder(tiny_data, tmp_path_factory):
    "The tiny benchmark as a folder dataset with RGB colour masks and the palette in classes.yaml."
    root = tmp_path_factory.mktemp("colour")
    pal = D.voc_palette()[:len(D.BENCHMARK.classes)]
    for split in ("train", "val"):
        items = D.voc_items(tiny_data, split)
        for i, img, mask in items:
            (root / "images").mkdir(exist_ok=True)
            (root / "masks").mkdir(exist_ok=True)
            Image.open(img).save(root / "images" / f"{i}.png")
            Image.fromarray(pal[np.array(Image.open(mask))]).save(root / "masks" / f"{i}.png")
        D.write_split(root / "splits" / f"{split}.txt", [i for i, _, _ in items])
    (root / "classes.yaml").write_text(yaml.safe_dump(dict(classes=list(D.BENCHMARK.classes), palette=pal.tolist())))
    return root


def test_colour_masks_in_prediction_pseudo_labels_and_ciscr(colour_folder, tmp_path):
    from semiseg.config import make_config
    from semiseg.runs import load_run, predict_run
    from semiseg.train import run, train
    from semiseg.methods.self_training import write_pseudo_labels, pseudo_label_miou
    opts = dict(dataset="folder", data_root=str(colour_folder), labeled=8, batch_size=4, batch_size_u=4, iters=2,
                workers=0)
    train(**opts, out_dir=str(tmp_path / "sup"))
    p = predict_run(tmp_path / "sup", n=2)                                           # the run's validation images
    assert len(p["gts"]) == 2 and set(np.unique(p["gts"][0])) <= set(range(7)) and p["palette"][1].tolist() == [128, 0, 0]
    ds = D.unlabeled_data(make_config(**opts)[0])                                     # the pseudo labels' ground truth
    write_pseudo_labels(load_run(tmp_path / "sup").eval_model(), ds, tmp_path / "pl")
    assert 0 <= pseudo_label_miou(ds, tmp_path / "pl", 7)["miou"] <= 100
    res = run(dict(opts, method="ciscr", out_dir=str(tmp_path / "ciscr")))           # CISC-R's labeled pool
    assert 0 <= res["miou"] <= 100 and res["stage_iters"] == [2, 2, 2]
