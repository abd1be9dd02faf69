"""Seed robustness, the library side: --seeds parsing, mean and standard deviation against hand-computed
values, the best run by the validation metric, and the best run's files kept in the output folder.
(train_finetune.py --seeds against each seed run alone: tests/test_finetune.py.)"""

import json
import math

import pytest

from minibert import seeds as S


def test_parse_seeds():
    assert S.parse_seeds("42,1,2") == [42, 1, 2]
    assert S.parse_seeds(" 7, 0 ") == [7, 0]
    with pytest.raises(ValueError, match="repeats 42: a seed run twice"):
        S.parse_seeds("42,1,42")
    with pytest.raises(ValueError, match="one seed"):
        S.parse_seeds("42")
    with pytest.raises(ValueError, match="integers separated by commas"):
        S.parse_seeds("42;1")
    with pytest.raises(ValueError, match="non-negative"):
        S.parse_seeds("1,-2")


RESULTS = {
    42: {"eval": {"accuracy": 0.80, "mse": 0.30, "per_class": {"pos": {"f1": 0.70, "support": 10}}, "name": "x"},
         "test": {"accuracy": 0.75}},
    1: {"eval": {"accuracy": 0.90, "mse": 0.20, "per_class": {"pos": {"f1": 0.90, "support": 10}}, "name": "x"},
        "test": {"accuracy": 0.85}},
    2: {"eval": {"accuracy": 0.85, "mse": 0.40, "per_class": {"pos": {"f1": 0.80, "support": 10}}, "name": "x"},
        "test": {"accuracy": 0.80}},
}


def test_mean_and_sample_standard_deviation_of_every_metric():
    summary = S.summarise(RESULTS)
    assert summary["mean"]["eval"]["accuracy"] == pytest.approx(0.85)
    # sample standard deviation of 0.80, 0.90, 0.85: sqrt((0.05^2 + 0.05^2 + 0) / 2) = 0.05
    assert summary["std"]["eval"]["accuracy"] == pytest.approx(0.05)
    assert summary["mean"]["eval"]["per_class"]["pos"]["f1"] == pytest.approx(0.80)
    assert summary["std"]["eval"]["per_class"]["pos"]["f1"] == pytest.approx(0.10)
    assert summary["std"]["eval"]["per_class"]["pos"]["support"] == 0.0
    assert summary["mean"]["test"] == {"accuracy": pytest.approx(0.80)}
    assert "name" not in summary["mean"]["eval"]  # not a number: not averaged
    without_test = {seed: {"eval": r["eval"], "test": None} for seed, r in RESULTS.items()}
    assert "test" not in S.summarise(without_test)["mean"]


def test_best_seed_by_the_validation_metric_in_its_direction():
    assert S.best_seed(RESULTS, "accuracy") == 1
    assert S.best_seed(RESULTS, "mse") == 1  # lower is better
    tied = {3: {"eval": {"accuracy": 0.5}}, 4: {"eval": {"accuracy": 0.5}}}
    assert S.best_seed(tied, "accuracy") == 3  # the first of equals
    assert S.best_seed({3: {"eval": {"accuracy": math.nan}}, 4: {"eval": {"accuracy": 0.1}}}, "accuracy") == 4


def test_run_seeds_runs_in_order_and_keeps_the_best_runs_files(tmp_path):
    order = []

    def run_one(seed, directory):
        order.append(seed)
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_text(f"weights of {seed}")
        (directory / ".minibert-run.lock").write_text("lock")
        (directory / "checkpoint").mkdir()
        return {**RESULTS[seed], "main_metric": "accuracy", "output_dir": str(directory)}

    summary = S.run_seeds([42, 1, 2], run_one, tmp_path)
    assert order == [42, 1, 2]
    assert (tmp_path / "model.safetensors").read_text() == "weights of 1"
    assert not (tmp_path / ".minibert-run.lock").exists() and not (tmp_path / "checkpoint").exists()
    saved = json.loads((tmp_path / S.RESULTS_FILE).read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["best_seed"] == 1 and saved["seeds"] == [42, 1, 2] and saved["metric"] == "accuracy"
    assert saved["runs"]["2"]["eval"]["accuracy"] == 0.85
    assert S.run_dir(tmp_path, 2) == tmp_path / "seeds" / "seed-2"



def test_a_resumed_run_skips_the_seeds_finished_before_and_forgets_them_when_done(tmp_path):
    """The library side of continuing a stopped --seeds run (the whole of it: tests/test_finetune_trust.py)."""
    order, stop_in = [], {1}

    def run_one(seed, directory):
        order.append(seed)
        if seed in stop_in:
            stop_in.remove(seed)
            raise KeyboardInterrupt  # the first start is stopped inside seed 1
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_text(f"weights of {seed}")
        return {**RESULTS[seed], "main_metric": "accuracy", "output_dir": str(directory)}

    out = tmp_path / "a"
    S.start_run(out, {"seeds": "42,1,2"})
    with pytest.raises(KeyboardInterrupt):
        S.run_seeds([42, 1, 2], run_one, out)
    assert json.loads(S.finished_file(out, 42).read_text()) == {**RESULTS[42], "main_metric": "accuracy"}
    assert not S.finished_file(out, 1).exists() and S.find_unfinished_run(out) == out / "seeds"
    summary = S.run_seeds([42, 1, 2], run_one, out, resume=True)
    assert order == [42, 1, 1, 2]  # seed 42 is not run again
    assert summary == S.run_seeds([42, 1, 2], run_one, tmp_path / "b")  # as a run never stopped
    assert S.find_unfinished_run(out) is None and not list((out / "seeds").glob("*.json"))  # finished: nothing to continue
    # A record counts only when resuming, and only while its run's folder holds the model.
    (out / "seeds" / "seed-1" / "model.safetensors").unlink()
    for seed in (42, 1):
        S.finished_file(out, seed).write_text(json.dumps({**RESULTS[seed], "main_metric": "accuracy"}))
    del order[:]
    S.run_seeds([42, 1, 2], run_one, out, resume=True)
    assert order == [1, 2]
    del order[:]
    S.run_seeds([42, 1, 2], run_one, out)
    assert order == [42, 1, 2]
