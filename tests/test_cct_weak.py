"""CCT with image-level labels (tags read off the masks or from a tags file, the CRF option) and CCT on two domains,
through `semiseg-train`."""
import importlib.util, json, subprocess, sys
from pathlib import Path
import pytest
from semiseg.data import BENCHMARK, dataset_spec, mask_tags

BIN = Path(sys.executable).parent
COMMON = ["method=cct_weak", "labeled=16", "batch_size=4", "batch_size_u=4", "iters=4", "log_every=2", "workers=0",
          "aux=f_noise:2,cutout:2"]


def run(data, out, *args):
    return subprocess.run([str(BIN / "semiseg-train"), f"data_root={data}", *COMMON, f"out_dir={out}", *args],
                          capture_output=True, text=True, timeout=600)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"weak"' in line]


@pytest.fixture(scope="module")
def tags_file(tiny_data, tmp_path_factory):
    "The training images' tags written as image-level annotation: `id class class ...`."
    spec = dataset_spec("synthetic", tiny_data)
    ds = spec.dataset(spec.items("train"))
    tags = mask_tags(ds)
    f = tmp_path_factory.mktemp("tags") / "tags.txt"
    f.write_text("".join(f"{i} {' '.join(BENCHMARK.classes[k] for k in t.nonzero().flatten())}\n"
                         for i, t in zip(ds.ids, tags)))
    return f


def test_trains_with_tags_from_masks_or_a_file(tiny_data, tags_file, tmp_path):
    a, b = tmp_path / "masks", tmp_path / "file"
    p = run(tiny_data, a)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((a / "results.json").read_text())
    assert (res["method"], res["iters"], res["n_unlabeled"]) == ("cct_weak", 4, 32) and 0 <= res["miou"] <= 100
    recs = records(a)
    assert [r["it"] for r in recs] == [2, 4]
    assert all(r["cls"] > 0 and r["weak"] > 0 and 0 < r["pseudo_labeled"] <= 1 for r in recs), recs
    p = run(tiny_data, b, f"tags={tags_file}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert records(b) == [{**r, "s_per_it": s["s_per_it"]} for r, s in zip(recs, records(b))]   # the same tags


def test_tags_file_missing_an_image_fails_before_training(tiny_data, tags_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(tags_file.read_text().splitlines()[:10]) + "\n")
    p = run(tiny_data, tmp_path / "run", f"tags={short}")
    assert p.returncode != 0 and str(short) in p.stderr and "no tags for" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 is not installed")
def test_crf_option_trains(tiny_data, tmp_path):
    p = run(tiny_data, tmp_path / "crf", "crf=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(0 < r["pseudo_labeled"] <= 1 for r in records(tmp_path / "crf"))


def test_crf_without_the_package_names_it(monkeypatch):
    from semiseg.config import make_config
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydensecrf" else real(name, *a))
    with pytest.raises(ValueError, match="crf=true needs the package pydensecrf2"):
        make_config(method="cct_weak", crf=True)


def test_cct_multi_trains_on_two_domains(tiny_data, tmp_path):
    "cct_multi through semiseg-train: the run's dataset and a CamVid-layout second domain of 11 classes, alternating."
    import numpy as np
    from PIL import Image
    from semiseg.data import synthetic_sample
    cv = tmp_path / "CamVid"
    for split, n in (("train", 12), ("val", 4)):
        (cv / split).mkdir(parents=True)
        (cv / f"{split}annot").mkdir()
        for i in range(n):
            im, mk = synthetic_sample(i, "train", seed=3)
            Image.fromarray(im).save(cv / split / f"{split}{i}.png")
            Image.fromarray(np.where(mk == 0, 11, mk + 3).astype(np.uint8)).save(cv / f"{split}annot" / f"{split}{i}.png")
    out = tmp_path / "multi"
    p = subprocess.run([str(BIN / "semiseg-train"), f"data_root={tiny_data}", "method=cct_multi", "labeled=16",
                        "batch_size=4", "batch_size_u=4", "iters=4", "log_every=1", "workers=0", "aux=f_noise:2",
                        "domain2=camvid", f"domain2_root={cv}", "domain2_labeled=4", "domain2_context_classes=",
                        f"out_dir={out}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"domain"' in line]
    assert [r["domain"] for r in recs] == [0.0, 1.0, 0.0, 1.0]
    res = json.loads((out / "results.json").read_text())
    assert res["n_unlabeled"] == 32 + 8
    d2 = res["evaluations"]["domain2"]                  # the trainer scores domain 2 on its own validation images
    assert len(d2["per_class_iou"]) == len(d2["class_names"]) == 11 and 0 <= d2["miou"] <= 100
    assert "domain2: mIoU" in p.stdout
