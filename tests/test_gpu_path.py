"""The GPU path, emulated on the CPU: mixed precision for every method, CCT's fp16 gradient, and torchrun runs.

No GPU is needed. CPU autocast with bfloat16 and float16 (with the GradScaler) reproduces the dtype errors and
underflows that fp16 autocast causes on CUDA; two gloo processes launched by torchrun stand in for NCCL ranks."""
import json, math, subprocess, sys
from pathlib import Path
import pytest
import torch

from semiseg.bench import timed_methods
from semiseg.data import make_synthetic
from semiseg.method import registered
from semiseg.train import train

BIN = Path(sys.executable).parent
TINY = dict(labeled=8, batch_size=2, batch_size_u=2, crop=32, iters=2, log_every=1, workers=0, eval_every=0,
            ckpt_every=2)


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    "A very small benchmark: 24 train and 4 val scenes of 32 px."
    return make_synthetic(tmp_path_factory.mktemp("data16"), n_train=24, n_val=4, size=32, seed=0)


@pytest.fixture(scope="module")
def rectify_options(data16, tmp_path_factory):
    "What `ciscr_rectify` needs: a teacher checkpoint (a 2-iteration stage 1) and pseudo labels of the unlabeled set."
    from semiseg.config import make_config
    from semiseg.data import build_data
    from semiseg.pseudo import write_pseudo_labels
    from semiseg.runs import load_run
    from semiseg.transforms import eval_transform
    out = tmp_path_factory.mktemp("teacher")
    train(method="ciscr_stage1", data_root=str(data16), out_dir=str(out / "stage1"), **TINY)
    cfg = make_config(data_root=str(data16), **TINY)[0]
    data = build_data(cfg)
    unl = data.spec.dataset(data.unlabeled.items, eval_transform())
    write_pseudo_labels(load_run(out / "stage1", device="cpu").eval_model(), unl, out / "pl")
    return dict(teacher=str(out / "stage1" / "ckpt" / "last.pt"), pseudo_dir=str(out / "pl"))


METHODS = [name for name, info in registered().items() if not info.pipeline]


def test_sweep_covers_the_pipelines_stage_methods():
    stage_methods = {m for name, info in registered().items() if info.pipeline
                     for m in info.cls(info.cls.Options()).stages().values()}
    assert stage_methods <= set(METHODS), stage_methods - set(METHODS)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_autocast(method, amp, data16, rectify_options, tmp_path):
    "Each registered method, 2 iterations of the real loop under CPU autocast (fp16: with the loss scaler)."
    extra = rectify_options if method == "ciscr_rectify" else {}
    out = tmp_path / "run"
    res = train(method=method, amp=amp, data_root=str(data16), out_dir=str(out), **TINY, **extra)
    assert math.isfinite(res["miou"])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) and "skipped" not in r for r in recs), recs


def test_cct_consistency_gradient_survives_fp16():
    "At sizes where each element's gradient underflows fp16, CCT's consistency term still reaches the decoders."
    from semiseg.config import make_config
    from semiseg.methods.cct import CCT
    torch.manual_seed(0)
    cfg, opts = make_config(method="cct", crop=192, decoder="subpixel")   # no bias: fp16 logits
    m = CCT(cfg, opts, 21).train()
    img = torch.randn(2, 3, 192, 192)
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(dict(image=img, mask=torch.full((2, 192, 192), 255)), [dict(image=img)], it=10_000)
    (out["loss_unsup"] * 2.0 ** 16).backward()                      # GradScaler's initial scale
    g = m.aux.weight.grad
    assert out["loss_unsup"].dtype == torch.float32 and torch.isfinite(g).all()
    assert (g != 0).float().mean() > 0.5, (g != 0).float().mean()


TORCHRUN_SCRIPT = '''
import json, os, sys, torch
import semiseg.train as T
from semiseg.method import register
from semiseg.methods.supervised import Supervised

@register("draws", label="draws", color="#000000")
class Draws(Supervised):
    "Supervised, logging a random number of each step (what CutMix boxes or a strong view would draw)."
    def forward(self, labeled, unlabeled, it):
        return {**super().forward(labeled, unlabeled, it), "draw": torch.rand(())}

saved = T.save
def save(run, it, name="last.pt"):
    saved(run, it, name)
    bufs = {k: v.clone() for k, v in run.method.state_dict().items() if "running" in k}
    torch.save(bufs, run.out.parent / f"buffers_{run.info.rank}_{it}_{name}")
T.save = save

draws = T.Meter.add
def add(self, terms, loss, skipped=False):
    with open(os.environ["DRAWS"] + os.environ["RANK"], "a") as f:
        f.write(f"{float(terms['draw'])}\\n")
    draws(self, terms, loss, skipped)
T.Meter.add = add
T.main(sys.argv[1:])
'''


def torchrun(script, args, env=None, timeout=300):
    import os
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_two_ranks_draw_apart_and_save_equal_buffers(data16, tmp_path):
    "Two gloo ranks: different random draws each step, the same BatchNorm statistics whenever a checkpoint is saved."
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    p = torchrun(script, ["method=draws", f"data_root={data16}", f"out_dir={tmp_path / 'run'}", "labeled=8",
                          "batch_size=4", "crop=32", "iters=4", "ckpt_every=2", "log_every=2", "workers=0"],
                 env={"DRAWS": str(tmp_path / "draws")})
    assert p.returncode == 0, p.stderr[-3000:]
    d0, d1 = [(tmp_path / f"draws{r}").read_text().split() for r in (0, 1)]
    assert len(d0) == len(d1) == 4 and all(a != b for a, b in zip(d0, d1)), (d0, d1)
    for it in (2, 4):
        b0, b1 = [torch.load(tmp_path / f"buffers_{r}_{it}_last.pt") for r in (0, 1)]
        assert b0.keys() == b1.keys() and len(b0) > 0
        assert all(torch.equal(b0[k], b1[k]) for k in b0), [k for k in b0 if not torch.equal(b0[k], b1[k])][:3]


PIPELINE_SCRIPT = '''
import os, sys
import semiseg.pseudo as P
from semiseg.train import main

written = P.save_label_png
def save_label_png(path, labels):
    with open(os.environ["WRITES"], "a") as f:
        f.write(f"{path}\\n")
    written(path, labels)
P.save_label_png = save_label_png
main(sys.argv[1:])
'''


@pytest.mark.parametrize("pipeline", ["self_training", "ciscr"])
def test_pipeline_under_torchrun_writes_each_label_once(pipeline, data16, tmp_path):
    "A pipeline on two processes: every pseudo label is written by exactly one rank, and the run finishes."
    script = tmp_path / "run.py"
    script.write_text(PIPELINE_SCRIPT)
    out, writes = tmp_path / "run", tmp_path / "writes.txt"
    extra = ["rounds=1"] if pipeline == "self_training" else ["tta=false"]
    p = torchrun(script, [f"method={pipeline}", f"data_root={data16}", f"out_dir={out}", "labeled=8", "batch_size=2",
                          "batch_size_u=2", "crop=32", "iters=2", "workers=0", *extra],
                 env={"WRITES": str(writes)})
    assert p.returncode == 0, p.stderr[-3000:]
    paths = writes.read_text().split()
    assert paths and len(paths) == len(set(paths)), [x for x in paths if paths.count(x) > 1][:3]
    assert json.loads((out / "results.json").read_text())["method"] == pipeline


def test_gpu_check_command_runs_tiny_on_cpu(tmp_path):
    "`semiseg-bench --gpu-check` (what `make gpu-check` runs under torchrun), tiny, on the CPU: it cannot rot."
    p = subprocess.run([str(BIN / "semiseg-bench"), "--gpu-check", "--device", "cpu", "--tiny"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "runs" / "bench" / "gpu_check.json").read_text())["results"]
    ours = [m for m in timed_methods() if registered()[m].cls.__module__.startswith("semiseg.")]  # not tests' own
    assert sorted(res) == sorted(f"{m}/{d}" for m in ours for d in ("float16", "bfloat16"))        # every one
    assert "unknown" in p.stdout
