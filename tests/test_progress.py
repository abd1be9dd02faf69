"""What a run shows: status lines instead of a bar in a log, and the training curves."""

import json
import logging

import numpy as np
import pytest

from minibert import progress
from minibert.curves import plot_curves, smoothed


def test_in_a_log_a_status_line_at_most_every_thirty_seconds_and_at_the_end(monkeypatch, caplog):
    clock = iter(float(t) for t in range(0, 1000))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="minibert"):
        with progress.Progress(100, initial=10, desc="fine-tuning") as shown:  # a resumed run: 90 steps to go
            assert shown.bar.disable and shown.status_lines  # pytest's output is not a terminal
            for _ in range(90):
                shown.update(loss="0.5000")
    lines = [r.getMessage() for r in caplog.records if "fine-tuning step" in r.getMessage()]
    # the clock ticks once a step: lines at 30 s, 60 s, 90 s (steps 40, 70, 100); the last step is one of them
    assert [line.split(",")[0] for line in lines] == [f"minibert: fine-tuning step {s}/100" for s in (40, 70, 100)]
    assert lines[0] == "minibert: fine-tuning step 40/100, loss 0.5000, 0m30s elapsed, 1m00s left"


def test_without_progress_nothing_is_shown(caplog):
    with caplog.at_level(logging.INFO, logger="minibert"), progress.Progress(3, enabled=False) as shown:
        for _ in range(3):
            shown.update(loss="1")
    assert not shown.status_lines and not caplog.records


def test_smoothing_is_a_bias_corrected_moving_average():
    assert np.allclose(smoothed([2.0] * 50), 2.0)  # no pull towards zero at the start
    values = [float(v) for v in np.random.default_rng(0).normal(size=300)]
    beta, average, expected = 1 - 1 / 10, 0.0, []  # 300 steps: a window of 10
    for step, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        expected.append(average / (1 - beta**step))
    assert np.allclose(smoothed(values), expected)
    assert np.std(smoothed(values)[50:]) < 0.5 * np.std(values)


def test_training_curves_draw_the_loss_and_each_validation_metric(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    records = [{"split": "train", "step": s, "loss": 1.0 / s} for s in range(1, 41)]
    records += [{"split": "eval", "step": s, "loss": 0.5 / s, "accuracy": 0.5 + s / 100} for s in (20, 40)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_curves(metrics, tmp_path / "curves.png", eval_metrics=("accuracy", "f1"))  # no f1 logged: no panel
    height, width, _ = matplotlib.image.imread(tmp_path / "curves.png").shape
    assert (width, height) == (900, 350)  # two panels of 4.5 x 3.5 inches at 100 dpi: the loss, the accuracy
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert not plot_curves(empty, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
