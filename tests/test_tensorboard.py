"""The TensorBoard log of a run holds what metrics.jsonl holds, read back with TensorBoard's own reader."""
import json
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from semiseg.method import register
from semiseg.methods.supervised import Supervised
from semiseg.train import board_scalars, train


@register("crash_once", label="crashes once at iteration 4", color="#000000")
class CrashOnce(Supervised):
    "The supervised baseline, failing at iteration index `crash_at` while it is set (a crash in the middle of a run)."
    crash_at = None

    def forward(self, labeled, unlabeled, it):
        if it == CrashOnce.crash_at:
            raise RuntimeError("crash")
        return super().forward(labeled, unlabeled, it)


def board(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def expected_scalars(run_dir, class_names) -> dict:
    "{tag: [(iteration, value), ...]} of the records of `run_dir/metrics.jsonl`."
    out = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for tag, value in board_scalars(rec, class_names).items():
            out.setdefault(tag, []).append((rec["it"], value))
    return out


def test_board_matches_metrics_after_a_crash_and_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    kw = dict(method="crash_once", data_root=str(tiny_data), labeled=16, batch_size=4, iters=6, log_every=1,
              eval_every=3, ckpt_every=3, workers=0, check_data=False, out_dir=str(out))
    CrashOnce.crash_at = 4                            # logs iterations 1..4, checkpoint at 3, fails in the 5th
    with pytest.raises(RuntimeError, match="crash"):
        train(**kw)
    crashed = board(out / "tb")                       # closed on the error: its events are on disk
    assert [e.step for e in crashed.Scalars("train/loss")] == [1, 2, 3, 4]
    CrashOnce.crash_at = None
    res = train(**kw)                                 # resumes from iteration 3
    acc, expected = board(out / "tb"), expected_scalars(out, res["class_names"])
    assert [it for it, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [it for it, _ in expected["val/miou"]] == [3, 6]
    assert len([t for t in expected if t.startswith("val_iou/")]) == 7
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, events in expected.items():              # the interrupted run's iteration 4 is purged, not doubled
        assert [e.step for e in acc.Scalars(tag)] == [it for it, _ in events], tag
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([v for _, v in events], rel=1e-6), tag
    pictures = acc.Tags()["images"]
    assert len(pictures) == 4 and all(t.startswith("val_images/") for t in pictures)
    assert [e.step for e in acc.Images(pictures[0])] == [3, 6]
    assert (acc.Images(pictures[0])[0].width, acc.Images(pictures[0])[0].height) == (3 * 64, 64)


def test_tensorboard_off_writes_no_log(tiny_data, tmp_path):
    train(data_root=str(tiny_data), labeled=16, batch_size=4, iters=2, workers=0, check_data=False,
          tensorboard=False, out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "tb").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()
