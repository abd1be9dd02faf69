"""explanations.html: what the page holds, and how a real browser draws and sorts it (when chromium is there)."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from minibert.explanation_page import AGAINST_RGB, FOR_RGB, render_page, write_page


def words(text, values):
    """Attributions for the space-separated words of text."""
    result, start = [], 0
    for word, value in zip(text.split(" "), values):
        result.append({"word": word, "start": start, "end": start + len(word), "attribution": value})
        start += len(word) + 1
    return result


def check(steps=50):
    return {"attribution_sum": 0.4, "score_change": 0.41, "steps": steps, "within_tolerance": True}


RECORDS = [
    {"text": "a dull <b>tedious</b> film", "label": "negative", "score": 0.71, "explains": "probability of 'negative'",
     "explained_score": 0.71, "attributions": words("a dull <b>tedious</b> film", [0.01, 0.3, 0.2, -0.05]),
     "completeness": check(), "gold": "positive"},
    {"text": "a wonderful , moving story", "label": "positive", "score": 0.98, "explains": "probability of 'positive'",
     "explained_score": 0.98, "attributions": words("a wonderful , moving story", [0.0, 0.6, 0.01, 0.2, -0.1]),
     "completeness": check(), "gold": "positive"},
    {"text": "it is a film", "label": "positive", "score": 0.55, "explains": "probability of 'positive'",
     "explained_score": 0.55, "attributions": words("it is a film", [0.02, -0.01, 0.0, 0.03]),
     "completeness": {**check(400), "within_tolerance": False}},
    {"text": "Jim Henson was in Paris", "entities": [
        {"entity": "PER", "text": "Jim Henson", "start": 0, "end": 10, "score": 0.9, "explains": "score of PER 'Jim Henson'",
         "explained_score": 0.9, "attributions": words("Jim Henson was in Paris", [0.2, 0.3, 0.0, 0.01, -0.02]),
         "completeness": check()}]},
]


def test_page_holds_every_explanation_shaded_and_loads_nothing():
    page = render_page(RECORDS)
    assert page.count('<article class="card"') == 4  # three texts and one entity
    assert "default-src 'none'" in page  # the browser may fetch nothing
    assert not re.search(r"\b(src|href)=", page) and "http" not in page.lower().replace("http-equiv", "")
    assert "&lt;b&gt;tedious&lt;/b&gt;" in page and "<b>" not in page  # texts are shown, never run
    # the largest attribution of a text is the darkest; against the prediction is the other colour
    assert f'style="background: rgba({", ".join(map(str, FOR_RGB))}, 0.70); color: #fff" title="+0.6000">wonderful<' in page
    assert f'rgba({", ".join(map(str, AGAINST_RGB))}, 0.17); color: inherit" title="-0.1000">story<' in page
    assert re.findall(r'data-confidence="([0-9.]+)"', page) == ["0.710000", "0.980000", "0.550000", "0.900000"]
    assert 'class="wrong">positive' in page  # the first text's gold label differs from the prediction
    assert "outside the tolerance" in page and "400 steps" in page
    assert 'class="w entity"' in page  # the entity's words are marked


def test_a_page_of_nothing_explained_is_an_error():
    with pytest.raises(ValueError, match="explain them first"):
        render_page([{"text": "x", "label": "a", "score": 1.0}])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to render the page (apt-get install chromium)")
def test_chromium_draws_the_shading_and_sorts_by_confidence(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    page = write_page(tmp_path / "explanations.html", RECORDS)
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *HEADLESS, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = (matplotlib_image.imread(shot)[..., :3] * 255).round()  # (900, 1200, 3)

    def drawn(rgb, alpha):  # the colour over white, as the browser blends it
        target = 255 * (1 - alpha) + np.array(rgb) * alpha
        return int((np.abs(pixels - target).max(axis=-1) <= 3).sum())

    assert drawn(FOR_RGB, 0.70) > 300  # "wonderful", the strongest word, in full blue
    assert drawn(AGAINST_RGB, 0.17) > 100  # "story", against, in light red
    dom = subprocess.run([CHROMIUM, *HEADLESS, "--dump-dom", page.as_uri() + "#sort=desc"], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert re.findall(r'data-confidence="([0-9.]+)"', dom) == ["0.980000", "0.900000", "0.710000", "0.550000"]
