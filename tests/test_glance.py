"""The README's results-at-a-glance tables (models/glance.py): rows recorded from the runs' own JSON, seeds averaged
with their standard error, carried-over rows marked, and bad sources named."""
import json
import math

import pytest

from models.glance import REGISTRY, ROOT, GlanceError, load, main, read_source, record, table


def _metrics(path, **values):
    """An evaluate.py metrics.json of molecules (the keys it writes, not all of them)."""
    path.write_text(json.dumps({"n_samples": 1000, "samples": "x.extxyz", "data": "qm9", "eval_seconds": 3.0,
                                "fcd": None, **values}))
    return path


def test_seeds_are_averaged_with_their_standard_error(tmp_path):
    seeds = [_metrics(tmp_path / f"s{i}.json", atom_stability=a, mol_stability=m, validity=0.7,
                      validity_x_uniqueness=0.69) for i, (a, m) in enumerate([(0.90, 0.20), (0.92, 0.26), (0.94, 0.23)])]
    registry = load(tmp_path / "none.json")
    row = record(registry, "qm9", "mine", seeds, text={"label": "my model"}, root=tmp_path)
    stab = row["metrics"]["mol_stability"]
    assert stab["n"] == 3 and stab["mean"] == pytest.approx(0.23)
    assert stab["se"] == pytest.approx(math.sqrt(((0.03 ** 2) + (0.03 ** 2)) / 2 / 3))
    assert "eval_seconds" not in row["metrics"] and "fcd" not in row["metrics"]  # timings and nulls are not results
    assert row["samples"] == "1,000" and row["sources"][""] == {"files": ["s0.json", "s1.json", "s2.json"]}
    line = table(registry, "qm9").splitlines()[2]
    assert line.startswith("| my model | 1,000 |") and "| 23.0 ± 1.7 |" in line and "‡" not in line
    assert "EDM (published)" in table(registry, "qm9")


def test_a_sweep_a_log_and_prefixes_fill_one_row(tmp_path):
    sweep = tmp_path / "results.json"
    sweep.write_text(json.dumps({"sweep": "ablate", "runs": [
        {"run": "transformer-flow-qm9", "samples": 1000, "val_loss": 1.01, "metrics": {"match_rate@1": 0.72, "rmse@1": 0.36}},
        {"run": "transformer-flow-scratch", "samples": 1000, "val_loss": 1.2, "metrics": {"match_rate@1": 0.64}}]}))
    registry = load(tmp_path / "none.json")
    record(registry, "csp", "trunk", [sweep], run="transformer-flow-qm9", prefix="perov5.", root=tmp_path)
    record(registry, "csp", "trunk", [sweep], run="transformer-flow-scratch", prefix="carbon24.", root=tmp_path)
    line = table(registry, "csp").splitlines()[2]
    assert "| 72.0 / 0.360 | 64.0 / " in line  # the second prefix kept the first one's metrics
    with pytest.raises(GlanceError, match=r"results.json: a sweep's results need --run \(one of transformer-flow-qm9"):
        read_source(sweep)
    with pytest.raises(GlanceError, match="no run 'nope'"):
        read_source(sweep, run="nope")

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 100, "loss": 6.1, "time": 5.0}\n{"step": 200, "val_loss": 6.0, "mol_stability": 0.6, '
                   '"atom_stability": 0.96, "time": 9.0}\n')
    assert read_source(log, step=200) == ({"val_loss": 6.0, "mol_stability": 0.6, "atom_stability": 0.96}, None)
    with pytest.raises(GlanceError, match="log.jsonl: no evaluation at step 100"):
        read_source(log, step=100)
    log.write_text('{"step": 100}\nnot json\n')
    with pytest.raises(GlanceError, match="log.jsonl, line 2: not JSON"):
        read_source(log, step=200)


def test_a_students_nested_metrics_are_picked_and_named(tmp_path):
    source = tmp_path / "metrics.json"
    source.write_text(json.dumps({"teacher": "xtb", "accuracy": {"generated": {"force_mae_mev_per_a": 412.3},
                                                                "qm9": {"force_mae_mev_per_a": 40.2}}}))
    registry = load(tmp_path / "none.json")
    record(registry, "students", "mol", [source], prefix="used.",
           pick={"generated molecules": "accuracy.generated.force_mae_mev_per_a"}, root=tmp_path)
    record(registry, "students", "mol", [source], prefix="real.", pick={"QM9": "accuracy.qm9.force_mae_mev_per_a"},
           root=tmp_path)
    assert "| 412 on generated molecules | 40.2 on QM9 |" in table(registry, "students")
    with pytest.raises(GlanceError, match=r"metrics.json: no metric accuracy.test.force_mae_mev_per_a \(it has "):
        record(registry, "students", "mol", [source], pick={"x": "accuracy.test.force_mae_mev_per_a"}, root=tmp_path)


def test_a_carried_over_row_is_marked_until_its_run_is_recorded(tmp_path):
    registry = load(tmp_path / "none.json")
    with pytest.raises(GlanceError, match="--transcribed"):
        record(registry, "qm9", "old", [], values={"mol_stability": 0.232})
    record(registry, "qm9", "old", [], values={"mol_stability": 0.232}, transcribed="EXPERIMENTS.md#x",
           text={"label": "old run"})
    assert "| old run ‡ |" in table(registry, "qm9") and "carried over" in table(registry, "qm9")
    record(registry, "qm9", "old", [_metrics(tmp_path / "m.json", mol_stability=0.25)], root=tmp_path)
    assert "‡" not in table(registry, "qm9") and "transcribed" not in registry["qm9"][0]


def test_the_command_line_records_atomically_and_names_bad_input(tmp_path, capsys):
    registry = tmp_path / "glance.json"
    source = _metrics(tmp_path / "m.json", mol_stability=0.5, atom_stability=0.95)
    assert main(["record", "qm9", "mine", str(source), "--text", "label=mine", "--registry", str(registry)]) == 0
    assert "| mine | 1,000 |" in capsys.readouterr().out
    assert main(["qm9", "--registry", str(registry)]) == 0 and "| 50.0 |" in capsys.readouterr().out
    before = registry.read_text()
    (tmp_path / "bad.json").write_text("{")
    assert main(["record", "qm9", "mine", str(tmp_path / "bad.json"), "--registry", str(registry)]) == 2
    assert "bad.json: not JSON" in capsys.readouterr().err and registry.read_text() == before
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["record", "qm9", "mine", str(tmp_path / "list.json"), "--registry", str(registry)]) == 2
    assert "list.json: a JSON list, not the object of metrics" in capsys.readouterr().err
    assert main(["record", "qm9", "x", "--value", "mol_stability=high", "--transcribed", "w", "--registry",
                 str(registry)]) == 2
    assert "'high' is not a number" in capsys.readouterr().err


def test_recorded_rows_match_their_runs_where_the_runs_are_here():
    """The shipped registry's numbers are the runs' own: re-read each row's sources that exist on this machine (a
    fresh clone has none of them: out/ never ships)."""
    checked = 0
    for name, rows in load(REGISTRY).items():
        for row in rows:
            for prefix, source in row["sources"].items():
                files = [ROOT / f for f in source["files"]]
                if not all(f.exists() for f in files):
                    continue
                again = record(load(ROOT / "absent.json"), name, row["key"], files, run=source.get("run"),
                               step=source.get("step"), pick=source.get("pick"), prefix=prefix)
                for metric, value in again["metrics"].items():
                    assert row["metrics"][metric]["mean"] == pytest.approx(value["mean"]), (name, row["key"], metric)
                checked += 1
    if not checked:
        pytest.skip("none of the recorded runs is on this machine (out/ never ships)")
