"""Calibration metrics against hand-computed values, and temperature scaling against a known temperature."""

import logging
import math

import numpy as np
import pytest
import torch

from minibert.calibration import (
    CONFIG_KEY,
    calibration_metrics,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    probabilities,
    reliability_bins,
    temperature_for_config,
    temperature_from_config,
    top_label,
)

# Four 3-class predictions, away from bin edges (bins are 1/15 wide). As logits: log p, so softmax gives p back.
PROBS = np.array([[0.70, 0.20, 0.10],   # label 0: confidence 0.70, right    (bin 10)
                  [0.10, 0.83, 0.07],   # label 2: confidence 0.83, wrong    (bin 12)
                  [0.20, 0.18, 0.62],   # label 2: confidence 0.62, right    (bin 9)
                  [0.72, 0.18, 0.10]])  # label 1: confidence 0.72, wrong    (bin 10)
LABELS = np.array([0, 2, 2, 1])


def test_ece_brier_nll_hand_computed():
    metrics = calibration_metrics("classification", np.log(PROBS), LABELS)
    # bin 10: two examples, accuracy 1/2, mean confidence 0.71; bin 12: 0 vs 0.83; bin 9: 1 vs 0.62
    assert metrics["ece"] == pytest.approx(2 / 4 * abs(0.5 - 0.71) + 1 / 4 * 0.83 + 1 / 4 * (1 - 0.62), abs=1e-12)
    brier = [0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.83**2 + 0.93**2, 0.2**2 + 0.18**2 + 0.38**2, 0.72**2 + 0.82**2 + 0.1**2]
    assert metrics["brier"] == pytest.approx(sum(brier) / 4, abs=1e-12)
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.07) + math.log(0.62) + math.log(0.18)) / 4, abs=1e-12)


def test_brier_of_two_classes_is_halved():
    # scikit-learn's custom for binary problems: mean (p(positive) - y)^2, in [0, 1]
    logits = np.log([[0.9, 0.1], [0.3, 0.7]])
    assert calibration_metrics("classification", logits, [0, 0])["brier"] == pytest.approx((0.1**2 + 0.7**2) / 2)


def test_multilabel_metrics_hand_computed():
    p = np.array([[0.90, 0.19], [0.58, 0.70]])
    labels = np.array([[1, 0], [0, 1]])
    metrics = calibration_metrics("multilabel", np.log(p / (1 - p)), labels)
    # two-way confidences 0.90, 0.81, 0.58, 0.70 in four different bins; only the 0.58 one is wrong
    assert metrics["ece"] == pytest.approx((0.10 + 0.19 + 0.58 + 0.30) / 4)
    assert metrics["brier"] == pytest.approx((0.1**2 + 0.19**2 + 0.58**2 + 0.3**2) / 4)
    assert metrics["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.81) + math.log(0.42) + math.log(0.7)) / 4)


def test_temperature_divides_logits_and_keeps_every_label():
    logits = np.random.default_rng(0).normal(size=(50, 3)) * 4
    probs = probabilities("classification", logits, 2.5)
    np.testing.assert_allclose(probs, torch.softmax(torch.tensor(logits) / 2.5, dim=-1).numpy(), rtol=1e-12)
    assert (probs.argmax(-1) == logits.argmax(-1)).all()
    multi = probabilities("multilabel", logits, [0.5, 1.0, 3.0])
    np.testing.assert_allclose(multi, torch.sigmoid(torch.tensor(logits) / torch.tensor([0.5, 1.0, 3.0])).numpy(), rtol=1e-12)
    assert ((multi >= 0.5) == (logits >= 0)).all()


def test_reliability_bins_hand_computed():
    counts, accuracy, confidence = reliability_bins([0.0, 0.05, 0.5, 0.52, 1.0], [True, False, True, True, False], 10)
    assert counts.tolist() == [2, 0, 0, 0, 1, 1, 0, 0, 0, 1]  # 0 and 0.05 in the first bin, 0.5 in (0.4, 0.5]
    assert accuracy[0] == 0.5 and confidence[0] == pytest.approx(0.025) and accuracy[9] == 0.0
    assert np.isnan(accuracy[1])
    assert expected_calibration_error([0.0, 0.05, 0.5, 0.52, 1.0], [True, False, True, True, False], 10) == pytest.approx(
        (2 * abs(0.5 - 0.025) + abs(1 - 0.5) + abs(1 - 0.52) + abs(0 - 1.0)) / 5)


def _synthetic(true_temperature, num_labels=4, n=20_000, seed=0, multilabel=False):
    """Labels drawn from calibrated logits z; the model reports z * T, so dividing by T calibrates it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, num_labels))
    if multilabel:
        labels = (rng.random((n, num_labels)) < 1 / (1 + np.exp(-z))).astype(np.int64)
    else:
        cumulative = np.cumsum(np.exp(z) / np.exp(z).sum(-1, keepdims=True), axis=-1)
        labels = (rng.random((n, 1)) > cumulative).sum(-1)
    return z * np.asarray(true_temperature), labels


@pytest.mark.parametrize("true_temperature", [2.5, 0.6])  # over- and under-confident
def test_fitted_temperature_recovers_a_known_one(true_temperature):
    logits, labels = _synthetic(true_temperature)
    fitted = fit_temperature("classification", logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    before, after = (calibration_metrics("classification", logits, labels, t) for t in (1.0, fitted))
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 2


def test_multilabel_fits_one_temperature_per_label():
    logits, labels = _synthetic([2.0, 0.7, 1.3], num_labels=3, multilabel=True)
    fitted = fit_temperature("multilabel", logits, labels)
    assert fitted == pytest.approx([2.0, 0.7, 1.3], rel=0.05)


@pytest.mark.parametrize("case", ["too few", "one class", "all right"])
def test_temperature_stays_one_where_it_cannot_be_fitted(case, caplog):
    logits, labels = _synthetic(2.0, n=200)
    if case == "too few":
        logits, labels = logits[:9], labels[:9]
    elif case == "one class":
        labels = np.zeros_like(labels)
    else:
        labels = logits.argmax(-1)
    with caplog.at_level(logging.WARNING, logger="minibert"):
        assert fit_temperature("classification", logits, labels) == 1.0
    assert "kept T = 1" in caplog.text


def test_multilabel_label_of_one_class_keeps_its_temperature_alone(caplog):
    logits, labels = _synthetic([2.0, 2.0], num_labels=2, multilabel=True)
    labels[:, 1] = 1  # every example has label 1: nothing to fit that label's temperature on
    with caplog.at_level(logging.WARNING, logger="minibert"):
        fitted = fit_temperature("multilabel", logits, labels)
    assert fitted[0] == pytest.approx(2.0, rel=0.05) and fitted[1] == 1.0
    assert "label 1 has examples of one class only" in caplog.text


def test_bad_temperatures_and_tasks_are_refused():
    with pytest.raises(ValueError, match="positive number"):
        probabilities("classification", np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match="one per label"):
        probabilities("classification", np.zeros((2, 2)), [1.0, 2.0])
    with pytest.raises(ValueError, match="not 'regression'"):
        calibration_metrics("regression", np.zeros((2, 1)), [0.0, 1.0])


def test_reliability_diagram_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    logits, labels = _synthetic(2.5, n=2000)
    curves = {"before": top_label("classification", logits, labels), "after": top_label("classification", logits, labels, 2.5)}
    assert plot_reliability(tmp_path / "reliability.png", curves)
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_in_config_json_by_label_and_back():
    assert temperature_for_config(1.25) == 1.25 and temperature_from_config({CONFIG_KEY: 1.25}) == 1.25
    saved = temperature_for_config([2.0, 0.5], ["sports", "arts"])
    assert saved == {"sports": 2.0, "arts": 0.5}
    assert temperature_from_config({CONFIG_KEY: saved}, ["arts", "sports"]) == [0.5, 2.0]  # by name, in label order
    assert temperature_from_config({}) == 1.0  # a model that saved none predicts as it always did
    with pytest.raises(ValueError, match="no temperature for label"):
        temperature_from_config({CONFIG_KEY: saved}, ["arts", "music"])


def test_calibration_report_puts_before_beside_after():
    logits, labels = _synthetic(2.5, n=2000)
    report = calibration_report("classification", logits, labels, 2.5)
    assert report["ece"] == calibration_metrics("classification", logits, labels, 2.5)["ece"]
    assert report["nll_uncalibrated"] == calibration_metrics("classification", logits, labels)["nll"]
    assert set(report) == {"ece", "brier", "nll", "ece_uncalibrated", "brier_uncalibrated", "nll_uncalibrated"}
    assert set(calibration_report("classification", logits, labels, None)) == {"ece", "brier", "nll"}  # --no-calibrate
