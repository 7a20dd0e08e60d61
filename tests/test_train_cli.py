"""The `semiseg-train` contract, end to end in real processes: results.json, torchrun DDP, exact resume."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import torch

BIN = Path(sys.executable).parent
COMMON = ["labeled=16", "batch_size=4", "optimizer=adamw", "lr=0.002", "log_every=5"]


def run(args, **kw):
    return subprocess.run([str(BIN / "semiseg-train"), *args], capture_output=True, text=True, timeout=600, **kw)


def test_cli_writes_results(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run([f"data_root={tiny_data}", *COMMON, "iters=10", "workers=0", f"out_dir={out}"])
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results.json").read_text())
    for k in ("method", "dataset", "labeled", "iters", "eval_protocol", "miou", "per_class_iou", "wall_s"):
        assert k in res
    assert (res["method"], res["dataset"], res["labeled"], res["iters"], res["eval_protocol"]) == \
        ("supervised", "synthetic", 16, 10, "whole")
    assert len(res["per_class_iou"]) == 7 and 0 <= res["miou"] <= 100
    assert "mIoU" in p.stdout and "striped_disk" in p.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["iters"] == 10 and cfg["method"] == "supervised"


def test_cli_rejects_unknown_option(tmp_path):
    p = run(["iter=10", f"out_dir={tmp_path}/x"])
    assert p.returncode != 0 and "did you mean 'iters'" in p.stderr


def test_torchrun_two_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "semiseg.train",
                        f"data_root={tiny_data}", *COMMON, "iters=10", "workers=0", f"out_dir={out}"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["iters"] == 10 and 0 <= res["miou"] <= 100
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 2
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["it"] for l in lines if "loss" in l] == [5, 10]  # written once, by rank 0
    assert p.stdout.count("mIoU") == 1


def test_resume_after_kill_matches_uninterrupted_run(tiny_data, tmp_path):
    args = [f"data_root={tiny_data}", *COMMON, "iters=40", "ckpt_every=10"]
    ref = run([*args, "workers=0", f"out_dir={tmp_path/'ref'}"])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "semiseg-train"), *args, "workers=2", f"out_dir={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "ckpt" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    done = torch.load(ckpt, weights_only=True)["it"]
    assert done < 40, "the run finished before it could be killed"
    resumed = run([*args, "workers=2", f"out_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
    loss = lambda p: {l["it"]: l["loss"] for l in map(json.loads, p.read_text().splitlines()) if "loss" in l}
    la, lb = loss(tmp_path / "ref" / "metrics.jsonl"), loss(out / "metrics.jsonl")
    assert la == lb, (done, la, lb)  # records after the checkpoint were replaced, not duplicated
