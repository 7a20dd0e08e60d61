"""Bad inputs and faults, each built by the test itself, against the run's entry points (in-process, to stay fast):
a changed config never resumes silently, every option is checked before data is read, every file read has a clear
error, and the dataset check catches labels that teach nothing."""
import errno
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg import check, data as D, train as T
from semiseg.config import full_config, make_config, parse_args
from semiseg.core import atomic_save, load_checkpoint
from semiseg.sweep import sweep
from semiseg.runs import read_metrics

FAST = dict(batch_size=2, batch_size_u=2, workers=0, log_every=1, ckpt_every=1)


def fails(fn, *needles, exc=ValueError):
    "Call `fn`, expect `exc`, check that its message holds every needle; return the message."
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    return msg


def folder(root: Path, n=8, size=32, names=None, mask=None, classes="classes: [bg, a, b]\n", splits=True) -> Path:
    "A folder dataset: images/, masks/ (0..2, or `mask(i)`), classes.yaml and splits/{train,val}.txt."
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    names = names or [f"im{i}" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(root / "images" / f"{name}.png")
        m = rng.integers(0, 3, (size, size)) if mask is None else mask(i)
        Image.fromarray(np.asarray(m, np.uint8), "L").save(root / "masks" / f"{name}.png")
    if classes is not None:
        (root / "classes.yaml").write_text(classes)
    if splits:
        k = len(names) * 3 // 4
        D.write_split(root / "splits" / "train.txt", names[:k])
        D.write_split(root / "splits" / "val.txt", names[k:])
    return root


def fold_cfg(root, **kw):
    return make_config({"dataset": "folder", "data_root": str(root), "labeled": 2, **kw})[0]


# ------------------------------------------------------------------ resuming a run directory
@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    "Two finished 4-iteration runs to resume: the supervised baseline and CPS."
    root = tmp_path_factory.mktemp("runs")
    base = dict(data_root=str(tiny_data), labeled=8, lr=0.001, iters=4, **FAST)
    T.train(**base, out_dir=str(root / "sup"))
    T.train(**{**base, "method": "cps", "iters": 2, "out_dir": str(root / "cps")})
    return root, base


@pytest.mark.parametrize("change, key", [
    (dict(lr=0.01), "lr=0.001 there, 0.01 now"), (dict(labeled=16), "labeled=8 there, 16 now"),
    (dict(batch_size=4), "batch_size=2 there, 4 now"), (dict(seed=3), "seed=0 there, 3 now"),
    (dict(crop=48), "crop=64 there, 48 now"), (dict(method="mt"), "method='supervised' there, 'mt' now"),
    (dict(method="cps", cps_weight=3.0), "cps_weight=None there, 3.0 now"),
], ids=["lr", "labeled", "batch_size", "seed", "crop", "method", "method option"])
def test_resume_refuses_changed_options(runs, tmp_path, change, key, monkeypatch):
    "The same out_dir with other options stops before any data is read, naming the options and the ways out."
    root, base = runs
    src = root / ("cps" if change.get("method") == "cps" else "sup")
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = {f: (out / f).read_bytes() for f in ("config.json", "metrics.jsonl", "ckpt/last.pt")}
    monkeypatch.setattr(T, "build_data", lambda cfg: pytest.fail("data read before the config was checked"))
    monkeypatch.setattr(T, "check_dataset", lambda cfg: pytest.fail("data read before the config was checked"))
    opts = {**base, "iters": 8, **change, "out_dir": str(out)}
    fails(lambda: T.train(**opts), key, str(out), "another out_dir", "resume=false")
    assert before == {f: (out / f).read_bytes() for f in before}           # nothing rewritten


def test_resume_extends_iters_and_ignores_runtime_options(runs, tmp_path):
    "iters may grow (never fall below the checkpoint); workers, log_every, eval_every, device may change."
    root, base = runs
    out = tmp_path / "run"
    shutil.copytree(root / "sup", out)
    fails(lambda: T.train(**{**base, "iters": 2, "out_dir": str(out)}), "iters=4 there, 2 now",
          "not below the checkpoint's 4")
    res = T.train(**{**base, "iters": 6, "log_every": 2, "eval_every": 3, "device": "cpu", "out_dir": str(out)})
    assert res["iters"] == 6
    assert [r["it"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 6]
    assert json.loads((out / "config.json").read_text())["iters"] == 6


def test_resume_false_starts_over(runs, tmp_path):
    root, base = runs
    out = tmp_path / "run"
    shutil.copytree(root / "sup", out)
    T.train(**{**base, "lr": 0.01, "iters": 2, "resume": False, "out_dir": str(out)})
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    assert [r["it"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_finished_pipeline_refuses_other_options(tmp_path, tiny_data):
    "A pipeline's folder made with other options is refused before its config.json is rewritten."
    opts = dict(method="self_training", rounds=1, data_root=str(tiny_data), iters=2, out_dir=str(tmp_path / "st"))
    (tmp_path / "st").mkdir()
    old = {**full_config({**opts, "lr": 0.001}), "out_dir": opts["out_dir"]}
    (tmp_path / "st" / "config.json").write_text(json.dumps(old))
    fails(lambda: T.run({**opts, "lr": 0.01}), "lr=0.001 there, 0.01 now", "another out_dir")
    assert json.loads((tmp_path / "st" / "config.json").read_text()) == old


def test_partial_metrics_line_is_dropped_on_resume(runs, tmp_path):
    "A crash (or a full disk) in the middle of a metrics.jsonl write: resume drops the cut line with a warning."
    root, base = runs
    out = tmp_path / "run"
    shutil.copytree(root / "sup", out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"it": 5, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: line .* is incomplete"):
        T.train(**{**base, "iters": 5, "out_dir": str(out)})
    assert [r["it"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r] \
        == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "text"])
def test_unreadable_checkpoint_is_named(tmp_path, tiny_data, damage):
    "A last.pt that does not load names the file and the ways on, and never suggests unpickling it."
    ck = tmp_path / "run" / "ckpt" / "last.pt"
    atomic_save({"it": 1, "w": torch.randn(64, 64)}, ck)
    good = ck.read_bytes()
    ck.write_bytes({"truncated": good[: len(good) // 2], "random bytes": random.Random(0).randbytes(4096),
                    "empty": b"", "text": b"hello\n"}[damage])
    msg = fails(lambda: T.train(data_root=str(tiny_data), iters=2, out_dir=str(tmp_path / "run"), **FAST),
                f"cannot load the checkpoint {ck}", "resume=false", "another out_dir")
    assert "weights_only=False" not in msg and "unpickl" not in msg.lower()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ckpt" / "last.pt"
    atomic_save({"it": 1}, ck)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    fails(lambda: atomic_save({"it": 2}, ck), f"no space left on the disk of {ck}", "previous version", exc=OSError)
    assert load_checkpoint(ck)["it"] == 1 and sorted(p.name for p in ck.parent.iterdir()) == ["last.pt"]


# ------------------------------------------------------------------ options, checked before any data is read
@pytest.mark.parametrize("opts, needles", [
    (dict(iters=0), ["iters=0", ">= 1"]), (dict(iters=-5), ["iters=-5"]), (dict(iters=2.5), ["iters=2.5", "integer"]),
    (dict(eval_every=-1), ["eval_every=-1", ">= 0"]), (dict(ckpt_every=0), ["ckpt_every=0"]),
    (dict(log_every=0), ["log_every=0"]), (dict(eval_protocol="slid"), ["eval_protocol='slid'", "'slide'"]),
    (dict(eval_protocol="slide"), ["eval_crop="]), (dict(eval_protocol="slide", eval_crop=0), ["eval_crop=0"]),
    (dict(amp="fp32"), ["amp='fp32'", "auto, fp16, bf16, off"]), (dict(crop=0), ["crop=0"]), (dict(crop=-64), ["crop=-64"]),
    (dict(scale=[2.0, 0.5]), ["scale=[2.0, 0.5]", "scale=[0.5, 2.0]"]), (dict(scale=[-1, 2]), ["scale=[-1, 2]"]),
    (dict(optimizer="adam"), ["optimizer='adam'", "'adamw'"]), (dict(backbone="resnet19"), ["'resnet18'"]),
    (dict(batch_size=0), ["batch_size=0"]), (dict(lr=-0.1), ["lr=-0.1", "> 0"]), (dict(workers=-1), ["workers=-1"]),
    (dict(device="tpu"), ["device='tpu'"]), (dict(labeled="1/0"), ["labeled='1/0'"]), (dict(labeled=2.0), ["(0, 1]"]),
    (dict(momentum=1.5), ["momentum=1.5"]), (dict(dataset="vco"), ["'voc'"]), (dict(lr_ref_batch=0), ["lr_ref_batch=0"]),
    (dict(cps_weight=1.0), ["'cps_weight' for method=supervised", "an option of method=cps"]),
    ({"method": "ciscr", "stage1.iters": -1}, ["iters=-1"]), (dict(method="ciscr", iters=0), ["iters=0"]),
])
def test_bad_option_fails_before_data(tiny_data, tmp_path, monkeypatch, opts, needles):
    monkeypatch.setattr(T, "build_data", lambda cfg: pytest.fail("data read before the options were checked"))
    monkeypatch.setattr(T, "check_dataset", lambda cfg: pytest.fail("data read before the options were checked"))
    fails(lambda: T.run({"data_root": str(tiny_data), "out_dir": str(tmp_path / "run"), **opts}), *needles)
    assert not (tmp_path / "run").exists()


def test_out_dir_file(tmp_path):
    (tmp_path / "afile").write_text("")
    fails(lambda: make_config(out_dir=str(tmp_path / "afile")), "afile is a file, not a folder", "another out_dir")
    fails(lambda: make_config(out_dir=str(tmp_path / "afile" / "run")), "afile is a file")


def test_config_files_and_values(tmp_path):
    (tmp_path / "bad.yaml").write_text("iters: 5\nlr: [0.1\n")
    fails(lambda: parse_args([str(tmp_path / "bad.yaml")]), f"{tmp_path / 'bad.yaml'}: not valid YAML (line 3")
    (tmp_path / "evil.yaml").write_text("iters: !!python/object/apply:os.system ['echo pwned']\n")
    fails(lambda: parse_args([str(tmp_path / "evil.yaml")]), "evil.yaml: line 1, column 8: a !!python/... tag")
    (tmp_path / "twice.yaml").write_text("lr: 0.001\niters: 2\nlr: 0.01\n")
    with pytest.warns(UserWarning, match=r"twice.yaml: duplicate key 'lr' \(lines 1, 3\)"):
        assert parse_args([str(tmp_path / "twice.yaml")])["lr"] == 0.01
    fails(lambda: parse_args(["scale=[0.5,"]), "scale=[0.5,: not valid YAML")
    assert parse_args(["lr=1e-3", "weight_decay=5e-4"]) == dict(lr=1e-3, weight_decay=5e-4)
    with pytest.warns(UserWarning, match="labeled=1/8 is ignored: labeled_split=x.txt lists the labeled images"):
        make_config(labeled="1/8", labeled_split="x.txt")


def test_sweep_rejects_bad_options_without_running(tmp_path, tiny_data):
    rows = sweep({"iters": [0]}, dict(data_root=str(tiny_data)), out_root=tmp_path / "sw",
                 runner="cli", verbose=False)
    assert [r["status"] for r in rows] == ["failed"] and "iters=0" in rows[0]["error"]
    assert not list((tmp_path / "sw").glob("*.log"))                      # no run was launched


# ------------------------------------------------------------------ labels that teach nothing
def test_all_ignore_labels_fail_the_check(tmp_path):
    root = folder(tmp_path / "f", mask=lambda i: np.full((32, 32), 255))
    probs = check.check_dataset(fold_cfg(root))
    assert [(p.kind, p.path) for p in probs] == [("no labeled pixels", "train_split=train (the labeled images)"),
                                                 ("no labeled pixels", "val_split=val")]
    assert "every mask pixel is 255 (ignore)" in probs[0].message
    fails(lambda: T.train(fold_cfg(root, iters=2, out_dir=str(tmp_path / "run"), **FAST)), "no labeled pixels")
    assert not (tmp_path / "run").exists()


def test_cityscapes_train_ids_without_255(tmp_path):
    "Masks holding train ids 0..4 under the labelIds name: every pixel maps to ignore."
    root = tmp_path / "cs"
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n) if split == "train" else range(10, 10 + n):
            stem = root / "leftImg8bit" / split / "aachen" / f"aachen_000000_{i:06d}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 8)).save(f"{stem}_leftImg8bit.png")
            m = root / "gtFine" / split / "aachen" / f"aachen_000000_{i:06d}_gtFine_labelIds.png"
            m.parent.mkdir(parents=True, exist_ok=True)
            vals = [0, 1, 2, 3, 4] if split == "train" else [7, 26]
            Image.fromarray(np.resize(np.array(vals, np.uint8), (8, 16)), "L").save(m)
    cfg = make_config(dataset="cityscapes", data_root=str(root), labeled=2)[0]
    probs = check.check_dataset(cfg)
    assert [p.kind for p in probs] == ["no labeled pixels"] and "*_gtFine_trainIds.png" in probs[0].message


def test_many_empty_masks_warn(tmp_path):
    root = folder(tmp_path / "f", n=12, mask=lambda i: np.full((32, 32), 255 if i % 3 == 0 else 1))
    with pytest.warns(UserWarning, match=r"\[mostly ignore\] train_split=train .*: 3 of its 9 labeled images \(33%\)"):
        assert check.check_dataset(fold_cfg(root, labeled=9)) == []


# ------------------------------------------------------------------ images, split files, classes.yaml
def exif_image(path: Path, upright: np.ndarray):
    "Save `upright` stored turned by 90 degrees, with EXIF orientation 6 (what phones do)."
    ex = Image.Exif()
    ex[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=ex, quality=95)


@pytest.mark.parametrize("size", [(32, 32), (48, 32)], ids=["square", "non-square"])
def test_exif_orientation_is_applied_to_images(tmp_path, size):
    "A sideways-stored JPEG is read upright, so the mask drawn on the upright view lines up (and the check passes)."
    root = folder(tmp_path / "f")
    w, h = size
    upright = np.zeros((h, w, 3), np.uint8)
    upright[: h // 2] = 255
    (root / "images" / "im0.png").unlink()
    exif_image(root / "images" / "im0.jpg", upright)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = 1
    Image.fromarray(mask, "L").save(root / "masks" / "im0.png")
    with pytest.warns(UserWarning, match=r"\[rotated photos\] .*im0.jpg: 1 image\(s\) are stored rotated"):
        assert check.check_dataset(fold_cfg(root)) == []
    s = D.SegDataset([("im0", root / "images/im0.jpg", root / "masks/im0.png")])[0]
    img, m = s["image"].numpy().mean(0), s["mask"].numpy()
    assert img.shape == (h, w) and img[m == 1].mean() > 200 and img[m == 0].mean() < 60
    Image.fromarray(mask.T.copy(), "L").save(root / "masks" / "im0.png")  # drawn on the stored pixels instead
    if w != h:
        probs = check.check_dataset(fold_cfg(root))
        assert probs[0].kind == "size mismatch" and "EXIF orientation 6" in probs[0].message


def test_file_names_with_spaces(tmp_path):
    root = folder(tmp_path / "f", names=[f"photo {i}" for i in range(8)])
    data = D.build_data(fold_cfg(root))
    assert data.val.ids == ["photo 6", "photo 7"] and check.check_dataset(fold_cfg(root)) == []


def test_split_files(tmp_path):
    root = folder(tmp_path / "f")
    train = root / "splits" / "train.txt"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())                 # a byte-order mark
    assert D.folder_items(root, "train")[0][0] == "im0"
    train.write_bytes("im0\ncaf\u00e9\n".encode("latin-1"))
    fails(lambda: D.build_data(fold_cfg(root)), f"{train} is not UTF-8 text (byte 0xe9", "save it as UTF-8")
    train.write_text("# nothing yet\n\n")
    fails(lambda: D.build_data(fold_cfg(root)), f"split file {train} lists no images")
    shutil.rmtree(root / "splits")
    fails(lambda: D.build_data(fold_cfg(root)), f"{root / 'splits' / 'train.txt'} not found",
          "train_split=/lists/train.txt", exc=FileNotFoundError)
    assert "train_split=<file>" in D.FOLDER_LAYOUT


@pytest.mark.parametrize("text, needle", [
    ("classes: [bg, a\n", "classes.yaml: not valid YAML (line 2, column 1"),
    ("classes: !!python/object/apply:os.system ['echo pwned']\n", "classes.yaml: line 1, column 10: a !!python"),
    ("classes: [bg, a, b]\npalette: [[0, 0, 0], [0, 0], [1, 2, 3]]\n", "classes.yaml: palette entry 1 is [0, 0]"),
    ("classes: [bg, a, b]\npalette: [[0, 0, 0], [300, 0, 0]]\n", "palette entry 1 is [300, 0, 0]"),
], ids=["syntax", "python tag", "ragged palette", "value 300"])
def test_classes_yaml(tmp_path, capsys, text, needle):
    root = folder(tmp_path / "f", classes=text)
    fails(lambda: D.dataset_spec("folder", root), needle)
    with pytest.raises(SystemExit):
        check.main(["dataset=folder", f"data_root={root}", "labeled=2"])
    out = capsys.readouterr().out
    assert out.count(needle) == 1 and "<unicode string>" not in out and "inhomogeneous" not in out


def test_dataset_warnings(tmp_path, capsys):
    "val equal to / overlapping train, and one huge image among small ones: warnings, exit status 0."
    root = folder(tmp_path / "f")
    shutil.copy(root / "splits/train.txt", root / "splits/val.txt")
    Image.new("RGB", (1024, 1024)).save(root / "images/im1.png")
    Image.new("L", (1024, 1024)).save(root / "masks/im1.png")
    check.main(["dataset=folder", f"data_root={root}", "labeled=2"])
    out = capsys.readouterr()
    assert "warning: [val overlaps train] val_split=val: is the same set as train_split=train" in out.out
    assert "warning: [large image]" in out.out and "1024x1024 is 1024 times larger" in out.out
    assert "0 problem(s) and 2 warning(s)" in out.err
    D.write_split(root / "splits/val.txt", ["im6", "im0"])
    with pytest.warns(UserWarning, match=r"val_split=val: overlaps train_split=train: 1 images are in both"):
        check.check_dataset(fold_cfg(root))
