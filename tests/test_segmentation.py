"""Chinese word segmentation for whole-word masking: which tokens continue a jieba word, and masking whole
jieba words in pretraining shards, checked against jieba itself."""

import json

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


# ----------------------------------------------------------------------------- whole-word masking in pretraining


def chinese_documents(num_docs=60, seed=0):
    """Documents of random sentences made of jieba's most frequent two- to four-character words."""
    import os
    import random

    import jieba

    entries = [line.split() for line in open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8")]
    words = [w for w, freq, *_ in sorted(entries, key=lambda e: -int(e[1])) if 2 <= len(w) <= 4
             and all(is_cjk_character(c) for c in w)][:400]
    rng = random.Random(seed)
    return [[("".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "。") for _ in range(rng.randint(2, 6))]
            for _ in range(num_docs)]


@pytest.fixture(scope="module")
def chinese_corpus():
    from minibert.tokenizer_training import train_wordpiece_tokenizer

    documents = chinese_documents()
    return documents, train_wordpiece_tokenizer(documents, 2000)


def segmented_shards(tmp_path, segmenter, corpus):
    from minibert.pretraining_data.dataset import PretrainingDataset
    from minibert.pretraining_data.shards import build_pretraining_shards

    documents, tokenizer = corpus
    shards = build_pretraining_shards(documents, tokenizer, tmp_path, seq_len=64, nsp=False, heldout_fraction=0.0,
                                      corpus_id="chinese-test", segmenter=segmenter)
    return shards, PretrainingDataset(shards, "train"), tokenizer


def jieba_word_positions(tokens):
    """Independently of minibert: the positions of each jieba word of every run of CJK characters."""
    import jieba

    words, t = [], 0
    while t < len(tokens):
        if not is_cjk_character(tokens[t]):
            t += 1
            continue
        end = t
        while end < len(tokens) and is_cjk_character(tokens[end]):
            end += 1
        words += [list(range(t + s, t + e)) for _, s, e in jieba.tokenize("".join(tokens[t:end]))]
        t = end
    return words


def test_whole_word_masking_masks_jieba_words_together_at_the_rate_and_80_10_10(tmp_path, chinese_corpus):
    import math


    from minibert.pretraining_data.masking import IGNORE_INDEX, MaskingCollator

    shards, train, tokenizer = segmented_shards(tmp_path, "jieba", chinese_corpus)
    assert json.loads((shards / "meta.json").read_text())["settings"]["segmenter"].startswith("jieba-")
    p = 0.15
    collate = MaskingCollator.for_dataset(train, mask_prob=p, whole_word_mask=True, seed=0)
    words_total = picked_words = tokens_in_words = chosen_tokens = masked_tokens = unchanged = 0
    sum_sq = 0
    for epoch in range(3):
        collate.epoch = epoch
        rows = train.batch(list(range(len(train))))
        batch = collate(rows)
        assert "word_continues" not in batch  # the model never sees it
        for b in range(len(train)):
            n = int(rows["attention_mask"][b].sum())
            tokens = [tokenizer.id_to_token(int(i)) for i in rows["input_ids"][b, :n]]
            chosen = (batch["labels"][b, :n] != IGNORE_INDEX).tolist()
            for word in jieba_word_positions(tokens):
                marks = {chosen[t] for t in word}
                assert len(marks) == 1, (tokens, word, [chosen[t] for t in word])  # a whole jieba word, or none of it
                words_total += 1
                tokens_in_words += len(word)
                sum_sq += len(word) ** 2
                picked_words += marks.pop()
            real = batch["labels"][b, :n] != IGNORE_INDEX
            chosen_tokens += int(real.sum())
            masked_tokens += int((batch["input_ids"][b, :n][real] == train.mask_token_id).sum())
            unchanged += int((batch["input_ids"][b, :n][real] == rows["input_ids"][b, :n][real]).sum())
    assert tokens_in_words > 5000 and sum_sq > tokens_in_words  # many words, of several characters
    assert abs(picked_words - p * words_total) < 5 * math.sqrt(words_total * p * (1 - p))
    assert abs(chosen_tokens - p * tokens_in_words) < 5 * math.sqrt(p * (1 - p) * sum_sq)
    assert abs(masked_tokens - 0.8 * chosen_tokens) < 5 * math.sqrt(chosen_tokens * 0.16)
    assert abs(unchanged - 0.1 * chosen_tokens) < 5 * math.sqrt(chosen_tokens * 0.09) + 0.1 * chosen_tokens / 1000


def test_segmenter_none_masks_characters_and_has_its_own_cache_key(tmp_path, chinese_corpus):
    from minibert.pretraining_data.masking import IGNORE_INDEX, MaskingCollator

    jieba_dir = segmented_shards(tmp_path, "jieba", chinese_corpus)[0]
    shards, train, tokenizer = segmented_shards(tmp_path, "none", chinese_corpus)
    assert shards != jieba_dir and "segmenter" not in json.loads((shards / "meta.json").read_text())["settings"]
    assert not (shards / "train" / "word_continues.bin").exists()
    collate = MaskingCollator.for_dataset(train, mask_prob=0.15, whole_word_mask=True, seed=0)
    rows = train.batch(list(range(len(train))))
    labels = collate(rows)["labels"]
    split = 0
    for b in range(len(train)):
        n = int(rows["attention_mask"][b].sum())
        tokens = [tokenizer.id_to_token(int(i)) for i in rows["input_ids"][b, :n]]
        chosen = (labels[b, :n] != IGNORE_INDEX).tolist()
        split += sum(len({chosen[t] for t in word}) == 2 for word in jieba_word_positions(tokens))
    assert split > 50  # characters chosen on their own: words half masked
