"""A process killed while it writes a checkpoint leaves the previous checkpoint loadable."""
import signal, subprocess, sys, time
import torch
from semiseg.core import atomic_save, load_checkpoint

WRITER = """
import sys, torch
from semiseg.core import atomic_save
big = {"it": 2, "w": torch.randn(64, 1024, 1024)}   # 256 MB: the write takes a moment
while True: atomic_save(big, sys.argv[1])
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    ck = tmp_path / "last.pt"
    atomic_save({"it": 1, "w": torch.ones(3)}, ck)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(ck)])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".last.pt.*.tmp")) and time.time() < deadline: time.sleep(0.005)
    assert list(tmp_path.glob(".last.pt.*.tmp")), "the writer never started a save"
    p.send_signal(signal.SIGKILL); p.wait()
    assert load_checkpoint(ck)["it"] in (1, 2)  # the old file, or a complete new one: never a torn one
    if load_checkpoint(ck)["it"] == 1: assert torch.equal(load_checkpoint(ck)["w"], torch.ones(3))
    atomic_save({"it": 3}, ck)  # the next save also removes the killed writer's orphaned temp file
    assert load_checkpoint(ck)["it"] == 3 and not list(tmp_path.glob(".last.pt.*.tmp"))
