"""The experiment layer end to end: the papermill template with a real kernel, a 2×2 sweep with one failing run,
a sweep of both pipelines, a sweep of variants, every figure type from a small results table, and the figures template."""
import ast, json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import papermill as pm
from semiseg import figures as F, runs as R, sweep as S
from semiseg.papers import PAPER_LAMBDA, paper_rows
from semiseg.report import write_report
from semiseg.viewer import viewer
from semiseg.data import make_synthetic

PNG, PDF = b"\x89PNG\r\n\x1a\n", b"%PDF"
TINY = dict(labeled=8, batch_size=4, batch_size_u=4, workers=0, log_every=5, iters=10, n_show=2)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "The embedded benchmark, small: 40 training and 16 validation scenes."
    return make_synthetic(tmp_path_factory.mktemp("bench"), n_train=40, n_val=16)


@pytest.fixture(scope="module")
def template_run(bench, tmp_path_factory):
    "One execution of nbs/exp/train.ipynb through papermill with the python3 kernel."
    out = tmp_path_factory.mktemp("tpl") / "supervised-run"
    res = S.run_notebook(dict(TINY, data_root=str(bench), weight_decay=0.0005), out)
    return out, res


def images_ok(paths):
    for p in map(Path, paths):
        assert p.is_file() and p.stat().st_size > 0, p
        assert p.read_bytes()[:8 if p.suffix == ".png" else 4] == (PNG if p.suffix == ".png" else PDF), p


def test_template_parameters_match_the_module():
    params = pm.inspect_notebook(str(S.find_template()))
    assert list(params) == list(S.TEMPLATE_PARAMS)
    for name, p in params.items():
        assert p["inferred_type_name"] != "None" and p["help"], f"parameter {name} lacks a type or a comment"
    from semiseg.train import TrainConfig
    for k in params:           # semiseg-train's defaults, so both runners train the same thing (the demo's did not)
        if hasattr(TrainConfig, k) and k != "eval_every":       # eval_every: the template draws a five-point curve
            assert ast.literal_eval(params[k]["default"]) == getattr(TrainConfig, k), k


def test_template_through_papermill(template_run):
    out, res = template_run
    assert (res["method"], res["iters"], len(res["per_class_iou"])) == ("supervised", 10, 7)
    assert json.loads((out / "config.json").read_text())["weight_decay"] == 0.0005      # routed through `options`
    rec = S.record_path(out)
    assert rec == out.parent / "supervised-run.ipynb" and rec.is_file()
    nb = json.loads(rec.read_text())
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    assert ["injected-parameters"] in tags
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2                   # curves and predictions
    assert any("| striped_disk |" in "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    images_ok([out / "figures" / f"{n}.{e}" for n in ("curves", "qualitative") for e in ("png", "pdf")])
    assert len(list((out / "preds").glob("*.png"))) == 2
    tpl = json.loads(S.find_template().read_text())                                     # the template is untouched
    assert all(not c.get("outputs") for c in tpl["cells"] if c["cell_type"] == "code")
    with pytest.raises(ValueError, match="never executed in place"):
        S.record_path(S.find_template().with_suffix(""), S.find_template())


def test_sweep_2x2_with_a_failing_run(bench, tmp_path):
    # CPS with every image labeled has no unlabeled stream: it fails when the run sets up; the other three must finish
    grid = {"method": ["supervised", "cps"], "labeled": [8, 40]}
    rows = S.sweep(grid, dict(TINY, data_root=str(bench), iters=6, eval_every=0), out_root=tmp_path / "sweep", jobs=2,
                   runner="notebook", verbose=False)
    status = {(r["method"], r["labeled"]): r["status"] for r in rows}
    assert status == {("supervised", 8): "ok", ("supervised", 40): "ok", ("cps", 8): "ok", ("cps", 40): "failed"}, \
        [(r["run"], (r.get("error") or "")[-1500:]) for r in rows if r["status"] == "failed"]
    bad = next(r for r in rows if r["status"] == "failed")
    assert bad["exit_status"] == 1 and bad["miou"] is None
    assert "ValueError" in bad["error"] and "leaves none" in bad["error"] and "Traceback" in bad["error"]
    assert bad["failed_cell"].startswith("In [") and "# train" in bad["failed_cell"]
    assert Path(bad["notebook"]).is_file()                                               # the record shows the error too
    good = [r for r in rows if r["status"] == "ok"]
    assert all(0 <= r["miou"] <= 100 and r["iou_background"] is not None and r["wall_s"] > 0 for r in good)
    table = R.load_results(tmp_path / "sweep" / "results.csv")
    assert [r["run"] for r in table] == [r["run"] for r in rows] and table[0]["config"]["iters"] == 6
    header = (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["run", "status", "method", "dataset", "labeled", "seed"]
    assert {"miou", "iou_striped_disk", "wall_s", "error", "failed_cell", "exit_status", "config"} <= set(header)


def test_sweep_pipelines(bench, tmp_path):
    # self-training (1 round: 2 stages) and CISC-R (3 stages) as runs of a sweep; the notebook runner hands them to the CLI
    grid = [{"method": ["self_training"], "rounds": [1]}, {"method": ["ciscr"]}]
    base = dict(TINY, data_root=str(bench), iters=4, eval_every=0)
    rows = S.sweep(grid, base, out_root=tmp_path / "sweep", jobs=2, runner="notebook", verbose=False)
    assert [(r["run"], r["status"]) for r in rows] == [("self_training-8-s0-rounds1", "ok"), ("ciscr-8-s0", "ok")], rows
    st, ci = rows
    for row, final, n in ((st, "stage1", 2), (ci, "stage3", 3)):
        d = Path(row["out_dir"])
        res, last = (json.loads((d / f).read_text()) for f in ("results.json", f"{final}/results.json"))
        assert res["miou"] == last["miou"] and res["per_class_iou"] == last["per_class_iou"]            # the final stage's results
        assert row["miou"] == pytest.approx(last["miou"], abs=1e-6) and row["pixel_acc"] == pytest.approx(last["pixel_acc"], abs=1e-6)
        assert (res["method"], res["iters"], res["stage_iters"], res["final_stage"]) == (row["config"]["method"], 4 * n, [4] * n, final)
        assert row["stage_iters"] == [4] * n and row["stage_miou"][-1] == pytest.approx(last["miou"], abs=1e-6) and row["notebook"] is None
        summary = json.loads((d / f"{row['config']['method']}.json").read_text())
        assert res["pipeline"]["pseudo"] == summary["pseudo"]
        assert R.model_dir(d) == d / final
    st_pl = json.loads((Path(st["out_dir"]) / "results.json").read_text())["pipeline"]["pseudo"]
    assert st["config"]["rounds"] == 1 and st["config"]["stage_method"] == "supervised"
    assert len(st_pl) == 1 and 0 <= st_pl[0]["miou"] <= 100
    assert set(json.loads((Path(ci["out_dir"]) / "results.json").read_text())["pipeline"]["pseudo"]) == {
        "m0_all", "m0_reliable", "m0_unreliable", "m1_unreliable", "after_all"}
    again = S.sweep(grid, base, out_root=tmp_path / "sweep", runner="cli", verbose=False)      # finished: cached, same numbers
    assert [(r["status"], r["miou"]) for r in again] == [("cached", st["miou"]), ("cached", ci["miou"])]
    assert [r["run"] for r in R.load_results(tmp_path / "sweep")] == ["ciscr-8-s0", "self_training-8-s0-rounds1"]  # stages: no rows
    table = R.load_results(tmp_path / "sweep" / "results.csv")
    assert [r["stage_iters"] for r in table] == [[4, 4], [4, 4, 4]]
    done, skipped = F.render_all(table, tmp_path / "figures", paper=False)
    assert {"pseudo_label_quality", "qualitative", "methods"} <= set(done), skipped
    plr = F.pipeline_pseudo_rows(table)
    assert [(r["method"], r["stage"]) for r in plr][:2] == [("self_training", "round 1"), ("ciscr", "M0, all")]
    assert plr[0]["pl_miou"] == pytest.approx(st_pl[0]["miou"])
    report = write_report(table, tmp_path, figures=done).read_text()
    assert "| 2 × 4 |" in report and "| 3 × 4 |" in report, report


def test_sweep_variants(bench, tmp_path):
    variants = {"plain": {"ohem": False}, "+OHEM": {"ohem": True, "ohem_min_kept": 64}}
    rows = S.sweep({"method": ["supervised"]}, dict(TINY, data_root=str(bench), iters=4, eval_every=0), out_root=tmp_path / "sweep",
                   jobs=2, runner="cli", verbose=False, variants=variants)
    assert [(r["run"], r["status"], r["variant"]) for r in rows] == [
        ("supervised-8-s0-variantplain", "ok", "plain"), ("supervised-8-s0-variant+OHEM", "ok", "+OHEM")]
    for r in rows:
        cfg = json.loads((Path(r["out_dir"]) / "config.json").read_text())
        assert (cfg["ohem"], cfg["ohem_min_kept"]) == ((True, 64) if r["variant"] == "+OHEM" else (False, 100_000))
        assert r["config"]["ohem"] == cfg["ohem"] and "variant" not in cfg
    header = (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["run", "status", "method", "dataset", "labeled", "seed", "variant"] and "ohem" in header
    table = R.load_results(tmp_path / "sweep" / "results.csv")
    assert [(r["variant"], r["ohem"], r["miou"]) for r in table] == [("plain", False, rows[0]["miou"]), ("+OHEM", True, rows[1]["miou"])]
    done, skipped = F.render_all(table, tmp_path / "figures", paper=False)
    assert "ablation" in done, skipped
    images_ok(done["ablation"])


def test_render_all_pseudo_labels_from_pipeline_summaries(tmp_path):
    # what the pipelines write (no training): results.json with the pseudo-label rows of the pipeline's summary
    ciscr = ("M0, all", "M0, reliable", "M0, unreliable", "M1, unreliable", "after, all")
    runs = {("ciscr", 0): list(zip(ciscr, (60.0, 70.0, 48.0, 55.0, 63.0))),
            ("ciscr", 1): list(zip(ciscr, (62.0, 72.0, 50.0, 57.0, 65.0))),
            ("self_training", 0): [("round 1", 58.0), ("round 2", 61.0)]}
    rows = []
    for (m, s), quality in runs.items():
        d = tmp_path / f"{m}-s{s}"; d.mkdir()
        (d / "results.json").write_text(json.dumps(dict(pipeline=dict(pseudo_quality=[dict(subset=k, pl_miou=v) for k, v in quality]))))
        rows.append(dict(run=d.name, status="ok", method=m, dataset="synthetic", labeled="1/16", seed=s, miou=40.0 + s, out_dir=str(d),
                         stage_iters=[10] * 3, config=dict(method=m, seed=s)))
    rows.append(dict(run="ciscr-broken", status="failed", method="ciscr", labeled="1/16", seed=2, miou=None, out_dir=str(tmp_path / "ciscr-s0")))
    table = R.load_results(R.write_csv(rows, tmp_path / "results.csv"))
    plr = F.pipeline_pseudo_rows(table)
    got = {(r["method"], r["stage"], r["seed"]): r["pl_miou"] for r in plr}
    assert len(plr) == 12 and got[("ciscr", "M0, reliable", 1)] == 72.0 and got[("ciscr", "after, all", 0)] == 63.0
    assert got[("self_training", "round 2", 0)] == 61.0
    done, skipped = F.render_all(table, tmp_path / "figures", paper=False)
    assert "pseudo_label_quality" in done, skipped
    images_ok(done["pseudo_label_quality"])
    fig = F.pseudo_label_quality(plr, hue="stage")                                       # what render_all drew: means over seeds
    assert sorted(round(p.get_height(), 2) for p in fig.axes[0].patches) == [49.0, 56.0, 58.0, 61.0, 61.0, 64.0, 71.0]
    report = write_report(table, tmp_path, figures=done).read_text()
    assert "| CISC-R (`ciscr`) | 1/16 | 2 | 40.50 ± 0.71 |" in report and report.count("| 3 × 10 |") == 2, report


def test_sweep_cli_dry_run():
    p = subprocess.run([sys.executable, "-m", "semiseg.sweep", "method=supervised,cps", "labeled=1/16,1/8", "iters=5",
                        "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [l.split()[0] for l in p.stdout.splitlines()] == ["supervised-1of16-s0", "supervised-1of8-s0", "cps-1of16-s0", "cps-1of8-s0"]


def test_sweep_cli_variants_dry_run(tmp_path):
    f = tmp_path / "ablation.yaml"
    f.write_text("base: {method: ucc, iters: 5}\ngrid: {seed: [0, 1]}\nvariants:\n  plain: {ws: false, ugrm: false}\n  +WS: {ws: true, ugrm: false}\n")
    p = subprocess.run([sys.executable, "-m", "semiseg.sweep", str(f), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [l.split(" ", 1) for l in p.stdout.splitlines()]
    assert [n for n, _ in lines] == ["ucc-1of16-s0-variantplain", "ucc-1of16-s0-variant+WS", "ucc-1of16-s1-variantplain", "ucc-1of16-s1-variant+WS"]
    assert [(json.loads(r)["variant"], json.loads(r)["ws"]) for _, r in lines][:2] == [("plain", False), ("+WS", True)]



def dry_run(*args):
    "The runs `semiseg-sweep ... --dry-run` prints: [(name, params)]."
    p = subprocess.run([sys.executable, "-m", "semiseg.sweep", *map(str, args), "--dry-run"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [(name, json.loads(params)) for name, params in (line.split(" ", 1) for line in p.stdout.splitlines())]


def test_sweep_config_file_in_base(tmp_path):
    # a semiseg-train config file as every run's defaults: its list (scale) is one value, not a grid axis
    cfg = tmp_path / "paper.yaml"
    cfg.write_text("dataset: voc\nscale: [0.5, 2.0]\niters: 40000\nlr: 0.01\n")
    in_base, on_top = tmp_path / "in_base.yaml", tmp_path / "on_top.yaml"
    in_base.write_text(f"base: {{config: {cfg}, iters: 5}}\ngrid: {{method: [supervised, cps]}}\n")
    on_top.write_text(f"config: {cfg}\nbase: {{iters: 5}}\ngrid: {{method: [supervised, cps]}}\n")
    for runs in (dry_run(in_base), dry_run(on_top), dry_run(f"config={cfg}", "iters=5", "method=supervised,cps")):
        assert [n for n, _ in runs] == ["supervised-1of16-s0", "cps-1of16-s0"]
        assert [(r["scale"], r["iters"], r["lr"], r["dataset"]) for _, r in runs] == [([0.5, 2.0], 5, 0.01, "voc")] * 2
        assert S.flat_config(runs[0][1]) == dict(dataset="voc", scale=[0.5, 2.0], iters=5, lr=0.01, method="supervised")


def test_run_names_from_split_files():
    runs = dry_run("method=cps", "labeled_split=splits/voc/1_8/labeled.txt,splits/voc/1_4/labeled.txt", "seed=0,1")
    assert [n for n, _ in runs] == ["cps-1_8_labeled-s0", "cps-1_8_labeled-s1", "cps-1_4_labeled-s0", "cps-1_4_labeled-s1"]
    assert S.run_name(dict(method="cps", labeled="1/16", labeled_split="splits/city/1_30/labeled.txt")) == "cps-1_30_labeled-s0"


def test_paper_rows_only_beside_their_method():
    cps_t1 = paper_rows(paper="CPS", table="Table 1", backbone="resnet101")
    runs = [dict(method=m, dataset="voc", labeled=lab, seed=s, miou=70.0 + s) for m in ("supervised", "cps", "cps_ucc_aug")
            for lab in ("1/8", "1/4") for s in (0, 1)]
    drawn = F.paper_overlay(runs, cps_t1)
    assert {(p["method"], p["label"]) for p in drawn} == {("cps", "Ours (w/o CutMix Aug.)")} and len(drawn) == 4
    labels = [line.get_label() for line in F.miou_vs_labels(runs, paper=cps_t1).axes[0].lines]
    assert labels == ["Supervised", "CPS", "CPS + UCC aug.", "CPS (paper)"]
    with pytest.raises(ValueError, match="drawn only beside runs of the method that computes it"):
        F.paper_overlay([r for r in runs if r["method"] == "cps_ucc_aug"], cps_t1)

@pytest.fixture(scope="module")
def small_table(template_run, tmp_path_factory):
    "A results table with every kind of column the figures read, plus metrics.jsonl files of CPS-like runs."
    out, res = template_run
    d = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    rows = []
    for m, b in (("supervised", 30), ("cps_cutmix", 35), ("cct", 33)):
        for i, lab in enumerate(("1/16", "1/8", "1/4")):
            for s in (0, 1):
                rows.append(dict(run=f"{m}-{lab}-s{s}", status="ok", method=m, dataset="synthetic", labeled=lab, seed=s,
                                 miou=b + 7 * i + rng.normal(0, 1), out_dir=None))
    rows += [dict(run=f"cps-w{w}-s{s}", status="ok", method="cps", dataset="synthetic", labeled="1/8", seed=s, cps_weight=w,
                  miou=40 - (w - 1.5) ** 2 + rng.normal(0, 0.5), out_dir=None) for w in (0.5, 1.5, 3.0) for s in (0, 1)]
    rows += [dict(run=f"abl-{v}", status="ok", method="cps", dataset="synthetic", labeled="1/8", seed=0, variant=v, miou=x, out_dir=None)
             for v, x in (("Ls only", 30.0), ("+ Lu_cps", 34.0))]
    rows += [dict(run=f"pl-{h}-{s}", status="ok", method="ciscr", subset=h, seed=s, pl_miou=v + s) for h, v in (("reliable", 70), ("unreliable", 50)) for s in (0, 1)]
    for s in (0, 1):                                                                       # CPS-like runs with agreement logs
        rd = d / f"cps-agree-s{s}"; rd.mkdir()
        (rd / "metrics.jsonl").write_text("".join(json.dumps(dict(it=it, loss=1.0 / it, agree_l=0.7 + it / 1000, agree_u=0.6 + it / 1000,
                                                                  agree_all=0.65 + it / 1000)) + "\n" for it in range(10, 201, 10)))
        rows.append(dict(run=rd.name, status="ok", method="cps", dataset="synthetic", labeled="1/8", seed=s, miou=None, out_dir=str(rd)))
    rows.append(dict(run=out.name, status="ok", method="supervised", dataset="synthetic", labeled="1/32", seed=0, miou=res["miou"], out_dir=str(out)))
    rows.append(dict(run="broken", status="failed", method="cps", dataset="synthetic", labeled="1/8", seed=3, miou=None,
                     error="Traceback ...\nValueError: boom", failed_cell="In [4]: # train"))
    R.write_csv([dict(r, config={k: v for k, v in r.items() if k in ("method", "labeled", "seed", "cps_weight")}) for r in rows], d / "results.csv")
    return rows, d


FIGURES = [  # (name, function, arguments, a column whose absence it must reject)
    ("lines", lambda t, **k: F.miou_vs_labels(t, kind="line"), "labeled"),
    ("bars", lambda t, **k: F.miou_vs_labels(t, kind="bar"), "miou"),
    ("ablation", lambda t, **k: F.ablation_bars(t, by="variant", baseline="Ls only"), "variant"),
    ("lambda", lambda t, **k: F.lambda_sensitivity(t, param="cps_weight", paper=PAPER_LAMBDA), "cps_weight"),
    ("plq", lambda t, **k: F.pseudo_label_quality(t, hue="subset"), "pl_miou"),
    ("agreement", lambda t, **k: F.agreement_curve([r for r in t if r["run"].startswith("cps-agree")]), None),
    ("qualitative", lambda t, **k: F.qualitative_from_runs(F.pick_runs(t), n=2), "out_dir"),
]


@pytest.mark.parametrize("name,make,column", FIGURES, ids=[f[0] for f in FIGURES])
def test_figure_types(name, make, column, small_table, tmp_path):
    rows, _ = small_table
    fig = make(rows)
    images_ok(F.save_figure(fig, tmp_path, name))
    if column:
        with pytest.raises(ValueError, match=f"needs the column\\(s\\).*lacks {column}"):
            make([{k: v for k, v in r.items() if k != column} for r in rows])


def test_image_figures(template_run, tmp_path):
    out, _ = template_run
    from semiseg.data import cityscapes_palette, CITYSCAPES_CLASSES
    gt = np.zeros((2, 16, 32), np.uint8); gt[:, :5] = 10; gt[:, 8:12, 4:12] = 13; gt[:, 14:, :3] = 255
    img = np.full((2, 16, 32, 3), 120, np.uint8)
    images_ok(F.save_figure(F.qualitative_grid(img, gt, {"ours": gt}, palette=cityscapes_palette(), class_names=CITYSCAPES_CLASSES),
                            tmp_path, "city"))
    images_ok(F.save_figure(F.similarity_from_run(out, n=2), tmp_path, "similarity"))
    images_ok(F.save_figure(F.training_curves(out), tmp_path, "curves"))
    with pytest.raises(ValueError, match="agreement_curve needs the metrics.jsonl key"):
        F.agreement_curve(out)                                                           # a supervised run logs no agreement
    with pytest.raises(ValueError, match="2 images but 1 ground truths"):
        F.qualitative_grid(img, gt[:1], {"ours": gt})
    v = viewer({"run": out})
    images_ok(F.save_figure(v.figure(1, classes=("background",), alpha=0.4), tmp_path, "viewer"))


def test_figures_template_and_report(small_table, tmp_path):
    rows, d = small_table
    rec = tmp_path / "figures.ipynb"
    pm.execute_notebook(str(S.find_template("figures.ipynb")), str(rec), kernel_name="python3", progress_bar=False,
                        parameters=dict(results=str(d / "results.csv"), out_dir=str(tmp_path / "figures"), notes="a test table"))
    pngs = sorted(p.stem for p in (tmp_path / "figures").glob("*.png"))
    assert {"miou_vs_labels_line", "miou_vs_labels_bar", "ablation", "lambda_cps_weight", "agreement", "pseudo_label_quality",
            "qualitative", "similarity", "training_curves", "paper_cps_voc_r101"} <= set(pngs), pngs
    images_ok((tmp_path / "figures").glob("*.p*"))
    report = (tmp_path / "report.md").read_text()
    assert "| CPS + CutMix (`cps_cutmix`) | 1/16 | 2 |" in report and "a test table" in report and "ValueError: boom" in report
