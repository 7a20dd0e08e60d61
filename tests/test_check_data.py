"""`semiseg-check-data` and the check at the start of `semiseg-train`, on datasets the tests break themselves."""
import shutil, subprocess, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from semiseg import data as D

BIN = Path(sys.executable).parent


def test_check_data_cli(tiny_data, tmp_path):
    ok = subprocess.run([str(BIN / "semiseg-check-data"), f"data_root={tiny_data}"], capture_output=True, text=True)
    assert ok.returncode == 0 and "0 problem(s)" in ok.stderr, ok.stderr
    bad = tmp_path / "bad"; shutil.copytree(tiny_data, bad)
    i = D.read_split(bad / "ImageSets/Segmentation/train.txt")[2]
    jpg = bad / f"JPEGImages/{i}.jpg"; jpg.write_bytes(jpg.read_bytes()[:300])
    p = subprocess.run([str(BIN / "semiseg-check-data"), f"data_root={bad}"], capture_output=True, text=True)
    assert p.returncode == 1 and f"[undecodable] {jpg}" in p.stdout, p.stdout
    t = subprocess.run([str(BIN / "semiseg-train"), f"data_root={bad}", "iters=5", f"out_dir={tmp_path/'run'}"],
                       capture_output=True, text=True)
    assert t.returncode != 0 and "1 problem(s)" in t.stderr and str(jpg) in t.stderr
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_check_speed_on_embedded_benchmark():
    "The full 2,500-image benchmark is scanned in under 10 s (generated once, cached)."
    from semiseg.check import check_dataset
    from semiseg.config import make_config
    root = D.make_synthetic()
    t = time.time()
    probs = check_dataset(make_config(data_root=str(root))[0])
    assert probs == [] and time.time() - t < 10, time.time() - t
