"""Chinese word segmentation for whole-word masking: which tokens continue a jieba word."""

import numpy as np
import pytest

from minibert.segmentation import is_cjk_character, jieba_continuations, jieba_words, segmenter_version


def test_jieba_words_are_jiebas_own_segmentation():
    import jieba

    text = "我来到北京清华大学"
    words = jieba_words(text)
    assert ["".join(text[s:e]) for s, e in words] == jieba.lcut(text)  # 我 / 来到 / 北京 / 清华大学
    assert [text[s:e] for s, e in words] == ["我", "来到", "北京", "清华大学"]


def test_continuations_mark_every_character_after_a_words_first():
    tokens = ["[CLS]", "我", "来", "到", "北", "京", "清", "华", "大", "学", "[SEP]"]
    expected = [False, False, False, True, False, True, False, True, True, True, False]
    assert jieba_continuations(tokens).tolist() == expected


def test_runs_end_at_anything_that_is_not_one_cjk_character():
    # "北京" then a Latin word, digits, [UNK] and punctuation: no jieba word crosses them.
    tokens = ["北", "京", "apple", "##s", "北", "1994", "年", "[UNK]", "京", "，", "北", "京"]
    continues = jieba_continuations(tokens)
    assert continues.tolist() == [False, True, False, False, False, False, False, False, False, False, False, True]
    assert not jieba_continuations(["hello", "world", "##s"]).any()
    assert jieba_continuations([]).shape == (0,)


def test_cjk_ranges():
    assert is_cjk_character("北") and is_cjk_character("\U00020000") and is_cjk_character("\u3400")
    assert not any(is_cjk_character(t) for t in ("。", "，", "a", "1", "北京", "が", "한"))


def test_segmenter_version_names_jieba():
    import jieba

    assert segmenter_version("jieba") == f"jieba-{jieba.__version__}" and segmenter_version("none") == "none"
    with pytest.raises(ValueError, match="choose one of jieba, none"):
        segmenter_version("ltp")


def test_missing_jieba_is_a_one_line_error_naming_the_install(monkeypatch):
    import builtins

    from minibert import segmentation

    segmentation._jieba.cache_clear()
    real_import = builtins.__import__

    def no_jieba(name, *args, **kwargs):
        if name == "jieba":
            raise ImportError("No module named 'jieba'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jieba)
    with pytest.raises(ImportError, match=r"`pip install jieba`, or pass --segmenter none") as e:
        jieba_continuations(["北", "京"])
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    segmentation._jieba.cache_clear()
    assert jieba_continuations(["北", "京"]).tolist() == [False, True]
