"""Hostile but realistic use of scale.py, one row per case (the runner: tests/hostile.py). The lock, identity and
merge of sweeps on one --out are tested in test_scaling.py, its kills in test_crash_safety.py."""
import json

import pytest

from hostile import hostile_table

TINY_SWEEP = "--batch-size 8 --n-layers 1 --hidden 16 --iters 2 --train-args=--val-size=8"
CASES = [
    ("scale: --widths 5 for the Transformer", "scale.py model --arch transformer --widths 8 5 --data-dir {data} --out {w}/heads",
     1, ["--arch transformer cannot be built at width 5 and depth 4", "divisible by heads"], None),
    ("scale: an unbalanced quote in --train-args", "scale.py model --widths 8 --train-args '--lr --out {w}/quote", 2,
     ["--train-args", "not a list of flags a shell could split", "No closing quotation"], None),
    ("scale: an unbalanced quote in a variant", "scale.py ablate --variants base= lr='--lr --out {w}/quote2", 1,
     ["variant \"lr='--lr\"", "No closing quotation"], None),
    ("scale: a grid whose data is missing", "scale.py grid --data perov5 --iters 2 --data-dir {w}/mnt --out {w}/nodata", 1,
     ["perov_5/train.csv is missing", "copy the CDVAE release's perov_5/train.csv there"], "read-only"),
    ("scale: iso-FLOP budgets that buy no size its steps", "scale.py isoflop --budgets 1e6 --widths 8 --batch-size 8 --n-layers 1 --train-args=--val-size=8"
     + " --data-dir {data} --out {w}/tiny_budget", 1, ["C1e6-h8-l1: skipped: 1e+06 FLOPs buy 0 steps", "raise the budgets"], None),
    ("scale: iso-FLOP --params no width matches", "scale.py isoflop --budgets 1e9 --params 10 --data-dir {data} --out {w}/unmatched",
     1, ["gnn cannot be matched to 10 parameters within 10 %", "choose other --params"], None),
    ("scale: a data sweep past the data set's size", "scale.py data --sizes 500 100 1000 " + TINY_SWEEP + " --data-dir {data} --out {w}/past",
     0, ["n500: trained on all 229 training structures, fewer than the 500 asked for",
         "n1000: skipped: the training set holds only 229 structures"], None),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("scale_world")
    (w / "mnt").mkdir()
    return w



def _nothing_trained(w):
    assert not (w / "heads" / "h8-l4").exists()  # refused before the first, buildable, width ran


def _past_runs_recorded(w):
    runs = json.loads((w / "past" / "results.json").read_text())["runs"]
    assert [(r["run"], r["train_size"]) for r in runs] == [("n100", 100), ("n500", 229)]


THEN = {"scale: --widths 5 for the Transformer": _nothing_trained, "scale: a data sweep past the data set's size": _past_runs_recorded}


outcomes, test_hostile_case = hostile_table(CASES, THEN)
