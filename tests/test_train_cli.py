"""The `semiseg-train` contract, end to end in real processes: results.json, torchrun DDP, exact resume."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

BIN = Path(sys.executable).parent
COMMON = ["labeled=16", "batch_size=4", "log_every=5"]


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


RESUME_ARGS = [*COMMON, "iters=40", "ckpt_every=10"]


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    "An uninterrupted 40-iteration run (no loader workers)."
    out = tmp_path_factory.mktemp("ref") / "run"
    p = run([f"data_root={tiny_data}", *RESUME_ARGS, "workers=0", f"out_dir={out}"])
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_exactly(sig, tiny_data, reference_run, tmp_path):
    """Kill (or pre-empt) a run after its first checkpoint, rerun the same command: identical losses and metrics.

    The interrupted run uses 2 loader workers and the reference none: the per-sample seeds make augmentation
    independent of the worker count."""
    out = tmp_path / "interrupted"
    args = [f"data_root={tiny_data}", *RESUME_ARGS, "workers=2", f"out_dir={out}"]
    proc = subprocess.Popen([str(BIN / "semiseg-train"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out / "ckpt" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    done = torch.load(ckpt, weights_only=True)["it"]
    assert done < 40, "the run finished before it could be interrupted"
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and f"stopped by signal at iteration {done}" in err, err
        assert not (out / "results.json").exists()
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((reference_run / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
    # loss records (means over 5 iterations) are replaced after the checkpoint, not duplicated; the one window the
    # interruption split in two (e.g. 11-15 after a stop at 11) averages fewer iterations and is left out
    loss = lambda p: {l["it"]: l["loss"] for l in map(json.loads, p.read_text().splitlines())
                      if "loss" in l and not l["it"] - 5 < done < l["it"]}
    assert loss(reference_run / "metrics.jsonl") == loss(out / "metrics.jsonl"), done


def test_resume_refuses_another_architecture(tiny_data, reference_run, tmp_path):
    "Resuming a finished run's directory with another backbone is refused with a message, not a key dump."
    import shutil
    out = tmp_path / "run"; shutil.copytree(reference_run, out)
    p = run([f"data_root={tiny_data}", *RESUME_ARGS, "workers=0", "backbone=resnet18", f"out_dir={out}"])
    assert p.returncode != 0 and "backbone='tiny' there, 'resnet18' now" in p.stderr and "resume=false" in p.stderr, \
        p.stderr[-2000:]


FAILING_RANK = '''
import os, sys
from semiseg.method import register
from semiseg.methods.supervised import Supervised
from semiseg.train import main

@register("fails_on_rank1", label="fails on rank 1", color="#000000")
class FailsOnRank1(Supervised):
    def forward(self, labeled, unlabeled, it):
        if it == 3 and os.environ["RANK"] == "1": raise RuntimeError("rank 1 broke at iteration 3")
        return super().forward(labeled, unlabeled, it)

main(sys.argv[1:])
'''


def test_ddp_rank_failure_ends_the_job(tiny_data, tmp_path):
    "A rank that raises takes the whole torchrun job down with its message, instead of leaving rank 0 waiting."
    script = tmp_path / "fail.py"; script.write_text(FAILING_RANK)
    t = time.time()
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), "method=fails_on_rank1",
                        f"data_root={tiny_data}", *COMMON, "iters=20", "workers=0", f"out_dir={tmp_path/'run'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "rank 1 broke at iteration 3" in p.stderr, p.stderr[-3000:]
    assert time.time() - t < 120
    assert not (tmp_path / "run" / "results.json").exists()


def test_shipped_configs_parse():
    "configs/*.yaml hold only valid keys, for every method."
    from semiseg.method import registered
    from semiseg.config import make_config, parse_args
    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        for m in registered():
            cfg, _ = make_config(parse_args([str(f), f"method={m}"]))
            assert cfg.method == m and cfg.iters >= 10_000
