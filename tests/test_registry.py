"""One `register(...)` is all a new method needs: it is then in `semiseg-train --help`, in a sweep, in the figures
(label and colour), in the demo list, and it trains. The toy is registered in a fresh process, as a user's module would."""
import json, subprocess, sys

TOY = '''
import io, json, sys
from contextlib import redirect_stdout
from semiseg.method import register
from semiseg.methods.supervised import Supervised

@register("toy", label="Toy method", color="#123abc", weight="toy_weight", demo=True, order=3)
class Toy(Supervised):
    "The supervised baseline under another name."

from semiseg import demo as D, figures as F, sweep as S
from semiseg.config import full_config, usage
from semiseg.train import main

out = {}
out["help"] = [line.strip() for line in usage().splitlines() if line.strip().startswith("toy:")]
with redirect_stdout(io.StringIO()) as dry:
    S.main(["method=supervised,toy", "iters=5", "--dry-run"])
out["sweep"] = [line.split()[0] for line in dry.getvalue().splitlines()]
out["sweep_config"] = full_config(S.flat_config(dict(method="toy", iters=5)))["method"]
out["figures"] = [F.method_label("toy"), F.method_color("toy"), "toy_weight" in F.weight_keys()]
out["demo"] = D.demo_methods()[:5]
main([f"data_root={sys.argv[1]}", "method=toy", "labeled=8", "batch_size=4", "iters=2", "workers=0", f"out_dir={sys.argv[2]}"])
print(json.dumps(out))
'''


def test_one_registration_reaches_everything(tiny_data, tmp_path):
    p = subprocess.run([sys.executable, "-c", TOY, str(tiny_data), str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["help"] == ["toy: (no options)"]
    assert out["sweep"] == ["supervised-1of16-s0", "toy-1of16-s0"] and out["sweep_config"] == "toy"
    assert out["figures"] == ["Toy method", "#123abc", True]
    assert out["demo"] == ["supervised", "cps", "cps_cutmix", "cpc", "toy"]          # order 3, then by name
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (res["method"], res["iters"]) == ("toy", 2)
