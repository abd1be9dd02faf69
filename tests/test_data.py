"""Fine-tuning data: readers, errors, labels, tokenization, batching and the built-in tasks."""

import logging
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from minibert import assets
from minibert.config import IGNORE_INDEX
from minibert.data.batching import collate, eval_batches, in_original_order, train_batches
from minibert.data.encoding import Features, encode_examples
from minibert.data.examples import DataError, Example
from minibert.data.labels import LabelVocab
from minibert.data.readers import infer_task_type, load_examples
from minibert.data.tasks import GLUE_TASKS, load_glue, movie_reviews


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(assets.minilm_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def write(folder, name, text, encoding="utf-8"):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


# ---------------------------------------------------------------------------------------------------
# Readers


def test_csv_with_quoting_bom_and_crlf(tmp_path):
    path = write(tmp_path, "train.csv", '\ufefftext,label\r\n"Great, really ""great""",positive\r\nbad,negative \r\n')
    examples = load_examples(path, task_type="classification")
    assert examples == [Example('Great, really "great"', None, "positive"), Example("bad", None, "negative")]


def test_csv_quoted_newline_and_line_numbers(tmp_path):
    path = write(tmp_path, "train.csv", 'text,label\n"two\nlines",1\nthree,x,extra\n')
    with pytest.raises(DataError, match=r"train.csv line 4 has 3 fields but the header has 2"):
        load_examples(path, task_type="classification")


def test_tsv_pairs_keep_quotes_and_integer_labels(tmp_path):
    path = write(tmp_path, "dev.tsv", 'premise\thypothesis\tlabel\nHe said "hi\tShe left.\t1\n"Odd" one\tx\t0\n\n')
    examples = load_examples(path, task_type="classification", text_column="premise", text_pair_column="hypothesis")
    assert examples == [Example('He said "hi', "She left.", "1"), Example('"Odd" one', "x", "0")]


def test_jsonl_and_json_array(tmp_path):
    lines = '{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0.0}\n'
    expected = [Example("good", None, "1"), Example("bad", None, "0")]
    assert load_examples(write(tmp_path, "a.jsonl", lines), task_type="classification") == expected
    assert load_examples(write(tmp_path, "b.json", lines), task_type="classification") == expected
    array = '[{"text": "good", "label": 1},\n {"text": "bad", "label": 0}]'
    assert load_examples(write(tmp_path, "c.json", array), task_type="classification") == expected


def test_json_array_after_blank_lines_and_wrapped_in_an_object(tmp_path):
    expected = [Example("good", None, "1"), Example("bad", None, "0")]
    array = '\n  \n[{"text": "good", "label": 1},\n {"text": "bad", "label": 0}]\n'
    assert load_examples(write(tmp_path, "a.json", array), task_type="classification") == expected
    wrapped = '{"data": [\n  {"text": "good", "label": 1},\n  {"text": "bad", "label": 0}\n]}\n'
    assert load_examples(write(tmp_path, "b.json", wrapped), task_type="classification") == expected
    # One field holding a list of words is one record, not a wrapper: the list holds no objects.
    sentence = write(tmp_path, "c.json", '{"tokens": ["EU", "rejects"]}\n')
    assert load_examples(sentence, task_type="token-classification", require_labels=False) == [
        Example(["EU", "rejects"])
    ]
    # The blank lines count in the line numbers of a JSON error: the stray comma is on line 3.
    with pytest.raises(DataError, match=r"d\.json is not valid JSON: .*line 3 column 15"):
        load_examples(write(tmp_path, "d.json", '\n\n[{"text": "a",}]\n'), task_type="classification")


def test_whitespace_only_table_lines_are_skipped(tmp_path):
    csv_path = write(tmp_path, "train.csv", "text,label\na,1\n   \nb,0\n\t\n")
    assert load_examples(csv_path, task_type="classification") == [Example("a", None, "1"), Example("b", None, "0")]
    tsv_path = write(tmp_path, "train.tsv", "text\tlabel\n \na\t1\n  \r\nb\tx\t0\n")
    with pytest.raises(DataError, match=r"train\.tsv line 5 has 3 fields"):  # the skipped lines still count
        load_examples(tsv_path, task_type="classification")


def test_regression_labels(tmp_path):
    path = write(tmp_path, "train.csv", "text,score\na,3.5\nb,-1e-1\n")
    examples = load_examples(path, task_type="regression", label_column="score")
    assert [ex.label for ex in examples] == [3.5, -0.1]


def test_multilabel_csv_and_jsonl(tmp_path):
    csv_path = write(tmp_path, "train.csv", "text,label\nx,comedy|action\ny,\nz,drama| drama |action\n")
    examples = load_examples(csv_path, task_type="multilabel")
    assert [ex.label for ex in examples] == [["comedy", "action"], [], ["drama", "action"]]
    jsonl_path = write(
        tmp_path, "train.jsonl", '{"text": "x", "label": ["comedy", "action"]}\n{"text": "y", "label": []}\n'
    )
    assert [ex.label for ex in load_examples(jsonl_path, task_type="multilabel")] == [["comedy", "action"], []]


def test_unlabelled_test_file(tmp_path):
    path = write(tmp_path, "test.tsv", "index\tsentence\n0\ta film\n1\tanother\n")
    examples = load_examples(path, task_type="classification", text_column="sentence", require_labels=False)
    assert examples == [Example("a film"), Example("another")]
    jsonl = write(tmp_path, "test.jsonl", '{"text": "a"}\n')
    assert load_examples(jsonl, task_type="regression", require_labels=False) == [Example("a")]


def test_conll(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "Peter\tB-PER\nBlackburn\tI-PER\n"  # tab-separated, no blank line at the end
    )
    examples = load_examples(write(tmp_path, "train.conll", text), task_type="token-classification")
    assert examples == [
        Example(["EU", "rejects"], None, ["B-ORG", "O"]),
        Example(["Peter", "Blackburn"], None, ["B-PER", "I-PER"]),
    ]
    unlabelled = write(tmp_path, "test.txt", "Peter\nBlackburn\n\nHi\n")
    assert load_examples(unlabelled, task_type="token-classification", require_labels=False) == [
        Example(["Peter", "Blackburn"]),
        Example(["Hi"]),
    ]


def test_test_file_mixing_labelled_and_unlabelled_names_the_first_unlabelled(tmp_path):
    fix = r"fill in every label, or leave the label column out entirely to only get predictions"
    csv_path = write(tmp_path, "test.csv", "text,label\na,pos\nb,\nc,neg\n")
    with pytest.raises(DataError, match=rf"test\.csv mixes labelled .*: line 3 has no label but line 2 has one; {fix}"):
        load_examples(csv_path, task_type="classification", require_labels=False)
    jsonl = write(tmp_path, "test.jsonl", '{"text": "a"}\n\n{"text": "b", "label": 0.5}\n')
    with pytest.raises(DataError, match=r"test\.jsonl mixes .*: line 1 has no label but line 3 has one"):
        load_examples(jsonl, task_type="regression", require_labels=False)
    conll = write(tmp_path, "test.conll", "EU B-ORG\nrejects O\n\nPeter\nBlackburn\n")
    with pytest.raises(DataError, match=r"test\.conll mixes .*: line 4 has no label but line 1 has one"):
        load_examples(conll, task_type="token-classification", require_labels=False)


def test_token_jsonl(tmp_path):
    text = (
        '{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n'
        '{"tokens": [], "tags": []}\n'  # an empty sentence is skipped
        '{"tokens": ["x"], "tags": [3]}\n'
    )
    examples = load_examples(write(tmp_path, "train.jsonl", text), task_type="token-classification")
    assert examples == [Example(["EU", "rejects"], None, ["B-ORG", "O"]), Example(["x"], None, ["3"])]


# ---------------------------------------------------------------------------------------------------
# Task type inference


SCORES = "regression", "the labels are numbers with fractions"
WHOLE_NUMBERS = "classification", "the labels are whole numbers"
NOT_NUMBERS = "classification", "the labels are not all numbers"


@pytest.mark.parametrize(
    "name, text, columns, expected",
    [
        ("train.conll", "EU B-ORG\nrejects O\n", {}, ("token-classification", "a .conll file")),
        ("train.jsonl", '{"tokens": ["EU"], "tags": ["B-ORG"]}\n', {},
         ("token-classification", "the 'tokens' field holds word lists")),
        ("train.json", '[{"text": ["EU"], "label": ["B"]}]', {},
         ("token-classification", "the 'text' field holds word lists")),
        ("train.jsonl", '{"words": [], "label": 1}\n', {"text_column": "words"},
         ("token-classification", "the 'words' field holds word lists")),
        ("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n', {},
         ("multilabel", "the labels are JSON lists")),
        ("train.jsonl", '{"text": "a", "label": 3}\n{"text": "b", "label": 3.7}\n', {}, SCORES),
        ("train.csv", "text,label\na,0.25\nb,-1.5\nc,2\n", {}, SCORES),
        ("train.tsv", "text\tscore\na\t1\nb\t1e-1\n", {"label_column": "score"}, SCORES),
        ("train.csv", "text,label\na,1\nb,2\nc,5\nd,1.0\n", {}, WHOLE_NUMBERS),
        ("train.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n', {}, WHOLE_NUMBERS),
        ("train.csv", "text,label\na,0.5\nb,x|y\n", {}, NOT_NUMBERS),
        ("train.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": true}\n', {}, NOT_NUMBERS),
    ],
)  # fmt: skip
def test_infer_task_type(tmp_path, name, text, columns, expected):
    assert infer_task_type(write(tmp_path, name, text), **columns) == expected


@pytest.mark.parametrize(
    "name, text",
    [
        ("missing.csv", None),
        ("train.txt", "EU B-ORG\n"),  # CoNLL or a plain text? Loading says which to pass
        ("train.csv", "text,stars\na,0.5\n"),  # no label column
        ("train.csv", "text,label\n"),  # no labels
        ("train.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", label: 1}\n'),  # not JSON
        ("train.json", '[{"text": "a", "label": 0.5},'),  # not JSON
        ("train.csv", "text,label\n\"a,0.5\n"),  # a quote never closed
    ],
)
def test_infer_task_type_defaults_to_classification_on_files_it_cannot_read(tmp_path, name, text):
    path = tmp_path / name if text is None else write(tmp_path, name, text)
    assert infer_task_type(path) == ("classification", "default")
    latin1 = write(tmp_path, "latin1.csv", "text,label\ncaf\u00e9,0.5\n", encoding="latin-1")
    assert infer_task_type(latin1) == ("classification", "default")


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_missing_file_names_path_and_flag(tmp_path):
    with pytest.raises(DataError, match=r"--train-file: no such file: .*nope\.csv"):
        load_examples(tmp_path / "nope.csv", task_type="classification", flag="--train-file")


def test_missing_column_lists_columns_and_flag(tmp_path):
    path = write(tmp_path, "train.csv", "sentence,label\na,1\n")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: 'sentence', 'label'\).*--text-column"):
        load_examples(path, task_type="classification")
    with pytest.raises(DataError, match=r"no column 'hyp'.*--text-pair-column"):
        load_examples(path, task_type="classification", text_column="sentence", text_pair_column="hyp")
    jsonl = write(tmp_path, "train.jsonl", '{"text": "a", "stars": 1}\n')
    with pytest.raises(DataError, match=r"line 1 has no column 'label' \(columns: 'text', 'stars'\).*--label-column"):
        load_examples(jsonl, task_type="classification")


@pytest.mark.parametrize("name, text", [("empty.csv", ""), ("header.tsv", "text\tlabel\n"), ("blank.jsonl", "\n\n")])
def test_empty_dataset(tmp_path, name, text):
    with pytest.raises(DataError, match="has no examples"):
        load_examples(write(tmp_path, name, text), task_type="classification")


def test_not_utf8_names_line_byte_and_iconv(tmp_path):
    path = write(tmp_path, "train.tsv", "text\tlabel\ncaf\u00e9 ok\t1\nna\u00efve\t0\n", encoding="latin-1")
    # "text\tlabel\n" is 11 bytes and "caf" 3 more: the bad byte \xe9 is byte 14, on line 2.
    # iconv writes next to the file, not into the current directory.
    utf8_path = re.escape(str(tmp_path / "train.utf8.tsv"))
    with pytest.raises(DataError, match=rf"not UTF-8: line 2, byte 14 is b'\\xe9'.*WINDOWS-1252 .*> {utf8_path}`"):
        load_examples(path, task_type="classification")


@pytest.mark.parametrize("bom, encoding", [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")])
def test_utf16_is_named_with_its_iconv(tmp_path, bom, encoding):
    path = tmp_path / "train.csv"
    path.write_bytes(bom + "text,label\na,1\n".encode(encoding))
    command = re.escape(f"`iconv -f UTF-16 -t UTF-8 {path} > {tmp_path / 'train.utf8.csv'}`")
    with pytest.raises(DataError, match=rf"train\.csv is UTF-16 .*; re-encode it: {command}$"):
        load_examples(path, task_type="classification")


def test_bad_regression_label(tmp_path):
    path = write(tmp_path, "train.csv", "text,label\na,1.5\nb,positive\n")
    with pytest.raises(DataError, match=r"line 3: regression label 'positive' is not a finite number"):
        load_examples(path, task_type="regression")
    with pytest.raises(DataError, match=r"line 1: regression label 'nan'"):
        load_examples(write(tmp_path, "t.jsonl", '{"text": "a", "label": "nan"}\n'), task_type="regression")


def test_malformed_conll_line(tmp_path):
    path = write(tmp_path, "train.conll", "EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match=r"line 2: expected a word and its tag.*'rejects'"):
        load_examples(path, task_type="token-classification")


@pytest.mark.parametrize(
    "name, text, task_type, message",
    [
        (
            "a.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
            "classification",
            r"line 2 is not valid JSON",
        ),
        ("a.jsonl", '["a", 1]\n', "classification", r"line 1: expected a JSON object, found list"),
        ("a.jsonl", '{"text": "a", "label": ["x", "y"]}\n', "classification", r"needs --task-type multilabel"),
        ("a.jsonl", '{"text": "a", "label": null}\n', "classification", r"'label' is null"),
        ("a.csv", "text,label\na,\n", "classification", r"line 2: empty label in column 'label'"),
        (
            "a.txt",
            "text\tlabel\n",
            "classification",
            r"cannot tell the format .*\.txt.*use \.csv, \.tsv.*CoNLL .*--task-type token-classification",
        ),
        ("a.conll", "EU B-ORG\n", "classification", r"a\.conll is a CoNLL file.*pass --task-type token-classification"),
        (
            "a.jsonl",
            '{"text": ["EU", "rejects"], "label": "x"}\n',
            "classification",
            r"line 1: 'text' holds a list.*pass --task-type token-classification",
        ),
        ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "token-classification", r"2 words but 1 tags"),
        ("a.tsv", "text\tlabel\na\tb\t1\n", "classification", r"line 2 has 3 fields .* cannot hold one"),
    ],
)
def test_other_bad_input(tmp_path, name, text, task_type, message):
    with pytest.raises(DataError, match=message):
        load_examples(write(tmp_path, name, text), task_type=task_type)


@pytest.mark.parametrize("error", ["data", "corpus"])
def test_bad_data_ends_a_script_with_its_one_line_message(error):
    """What the scripts do with a DataError or CorpusError: exit status 1 and "error: ..." (no traceback)."""
    from minibert.cli import run_cli
    from minibert.pretraining_data.corpus import CorpusError

    raised = DataError("train.csv line 3: no label") if error == "data" else CorpusError("corpus.txt: no documents")

    def main(settings):
        raise raised

    with pytest.raises(SystemExit) as exit:
        run_cli(main, lambda argv: None, "train_x.py")
    assert exit.value.code == f"error: {raised}"


# ---------------------------------------------------------------------------------------------------
# Labels


def test_label_vocab_sorts_integers_numerically_and_strings_alphabetically():
    ints = LabelVocab.from_examples([Example("a", None, label) for label in ["10", "2", "0", "2"]], "classification")
    assert ints.labels == ["0", "2", "10"]
    names = LabelVocab.from_examples(
        [Example("a", None, label) for label in ["positive", "negative"]], "classification"
    )
    assert names.labels == ["negative", "positive"]
    assert names.label2id == {"negative": 0, "positive": 1}
    tags = LabelVocab.from_examples(
        [Example(["a", "b"], None, ["O", "B-PER"]), Example(["c"], None, ["I-PER"])], "token-classification"
    )
    assert tags.labels == ["B-PER", "I-PER", "O"]
    multi = LabelVocab.from_examples([Example("a", None, ["x", "a"]), Example("b", None, [])], "multilabel")
    assert multi.labels == ["a", "x"]


def test_label_vocab_sorts_every_kind_of_number_numerically():
    def sorted_labels(labels):
        return LabelVocab.from_examples([Example("a", None, label) for label in labels], "classification").labels

    assert sorted_labels(["1.0", "10.0", "2.0", "0.0"]) == ["0.0", "1.0", "2.0", "10.0"]
    assert sorted_labels(["10", "-1.5", "1.0", "1", "0.5"]) == ["-1.5", "0.5", "1", "1.0", "10"]  # 1 = 1.0: by spelling
    assert sorted_labels(["10", "2", "nan"]) == ["10", "2", "nan"]  # not a finite number: all alphabetically


def test_json_number_labels_are_named_by_value(tmp_path):
    text = '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0.25}\n{"text": "c", "label": 2}\n'
    examples = load_examples(write(tmp_path, "train.jsonl", text), task_type="classification")
    assert [ex.label for ex in examples] == ["1", "0.25", "2"]  # 1.0 is the class "1" (see _class_label)
    csv_path = write(tmp_path, "train.csv", "text,label\na,1.0\n")
    assert load_examples(csv_path, task_type="classification")[0].label == "1.0"  # a cell keeps its spelling


def test_unseen_labels_are_all_named_with_the_file():
    vocab = LabelVocab(["negative", "positive"])
    assert vocab.encode(["positive", "negative"]) == [1, 0]
    with pytest.raises(
        DataError,
        match=r"dev\.csv has labels the training data does not: 'neutral', 'postive' \(known: 'negative', 'positive'\)",
    ):
        vocab.encode(["positive", "postive", "neutral", "postive"], source="dev.csv")


def test_unseen_score_labels_suggest_regression():
    vocab = LabelVocab(["0.5", "1"])
    hint = "add training examples of them; if the labels are scores, pass --task-type regression$"
    with pytest.raises(DataError, match=rf"'0.75', '2' .*{hint}"):
        vocab.encode(["0.75", "2", "1"], source="dev.csv")
    with pytest.raises(DataError, match=r"add training examples of them$"):  # whole numbers: no hint
        vocab.encode(["2"], source="dev.csv")


# ---------------------------------------------------------------------------------------------------
# Tokenization


def test_encode_mixed_labels_names_the_first_unlabelled(tokenizer):
    examples = [Example("a"), Example("b", None, "x"), Example("c")]
    with pytest.raises(DataError, match=r"the test data mixes .*: example 1 has no label; fill in every label"):
        encode_examples(tokenizer, examples, max_length=8, task_type="classification", source="the test data")


def test_encode_single_and_pair_keep_token_types(tokenizer):
    vocab = LabelVocab(["0", "1"])
    (single,) = encode_examples(
        tokenizer, [Example("The cat sat.", None, "1")], max_length=32, task_type="classification", label_vocab=vocab
    )
    assert single.input_ids.tolist() == [101, 1996, 4937, 2938, 1012, 102]  # [CLS] the cat sat . [SEP]
    assert single.token_type_ids.tolist() == [0] * 6 and single.label == 1
    (pair,) = encode_examples(
        tokenizer,
        [Example("The cat sat.", 'It was "fine".', "0")],
        max_length=32,
        task_type="classification",
        label_vocab=vocab,
    )
    # [CLS] the cat sat . [SEP] it was " fine " . [SEP]
    assert pair.input_ids.tolist() == [101, 1996, 4937, 2938, 1012, 102, 2009, 2001, 1000, 2986, 1000, 1012, 102]
    assert pair.token_type_ids.tolist() == [0] * 6 + [1] * 7
    # The caller's tokenizer keeps its settings: no truncation.
    assert tokenizer.truncation is None


def test_encode_ignores_the_tokenizers_own_padding_and_truncation():
    raw = Tokenizer.from_file(str(assets.minilm_dir() / "tokenizer.json"))  # pads and truncates to 128 by itself
    examples = [Example("The cat sat.", None, 1.0), Example(" ".join(["cat"] * 300), None, 2.0)]
    short, long = encode_examples(raw, examples, max_length=256, task_type="regression")
    assert len(short) == 6 and len(long) == 256
    assert raw.padding is not None and raw.truncation["max_length"] == 128  # the caller's copy is untouched


def test_truncation_longest_first(tokenizer):
    cats = " ".join(["cat"] * 20)
    (pair,) = encode_examples(tokenizer, [Example(cats, "dog dog", 2.0)], max_length=10, task_type="regression")
    # 7 places besides [CLS] [SEP] [SEP]; longest first cuts A (20 pieces) to 5 and keeps B's 2.
    assert pair.input_ids.tolist() == [101] + [4937] * 5 + [102] + [3899, 3899] + [102]
    assert pair.token_type_ids.tolist() == [0] * 7 + [1] * 3 and pair.label == 2.0
    (even,) = encode_examples(
        tokenizer, [Example(cats[:23], "dog dog dog dog", 2.0)], max_length=9, task_type="regression"
    )
    # 6 places for 6 + 4 pieces: A is cut to 4, level with B, then one from each.
    assert even.input_ids.tolist() == [101] + [4937] * 3 + [102] + [3899] * 3 + [102]
    (single,) = encode_examples(tokenizer, [Example(cats, None, 0.5)], max_length=7, task_type="regression")
    assert single.input_ids.tolist() == [101] + [4937] * 5 + [102]
    with pytest.raises(ValueError, match="max_length=2 leaves no room"):
        encode_examples(tokenizer, [Example("a", None, 0.5)], max_length=2, task_type="regression")


def test_token_tags_on_first_pieces(tokenizer):
    words = ["Johanson", "visited", "U.S.", "style", "."]
    example = Example(words, None, ["B-PER", "O", "B-LOC", "O", "O"])
    vocab = LabelVocab.from_examples([example], "token-classification")  # B-LOC 0, B-PER 1, O 2
    (features,) = encode_examples(
        tokenizer, [example], max_length=64, task_type="token-classification", label_vocab=vocab
    )
    tokens = [tokenizer.id_to_token(i) for i in features.input_ids]
    assert tokens == ["[CLS]", "johan", "##son", "visited", "u", ".", "s", ".", "style", ".", "[SEP]"]
    assert features.label.tolist() == [-100, 1, -100, 2, 0, -100, -100, -100, 2, 2, -100]
    assert features.word_ids.tolist() == [-1, 0, -1, 1, 2, -1, -1, -1, 3, 4, -1]


def test_token_truncation_drops_words_with_a_warning(tokenizer, caplog):
    example = Example(["Johanson", "visited", "Paris", "today"], None, ["B-PER", "O", "B-LOC", "O"])
    vocab = LabelVocab(["B-LOC", "B-PER", "O"])
    with caplog.at_level(logging.WARNING, logger="minibert.data"):
        (features,) = encode_examples(
            tokenizer,
            [example],
            max_length=5,
            task_type="token-classification",
            label_vocab=vocab,
            source="train.conll",
        )
    # [CLS] johan ##son visited [SEP]: "Paris" and "today" are cut off.
    assert features.label.tolist() == [-100, 1, -100, 2, -100]
    assert "1 of 1 sentences in train.conll are longer than max_length=5" in caplog.text
    assert "last 2 words" in caplog.text


def test_unlabelled_token_features_keep_word_ids(tokenizer):
    (features,) = encode_examples(
        tokenizer, [Example(["Johanson", "."])], max_length=16, task_type="token-classification"
    )
    assert features.label is None and features.word_ids.tolist() == [-1, 0, -1, 1, -1]


def test_encode_multilabel_and_unseen_label(tokenizer):
    vocab = LabelVocab(["action", "comedy", "drama"])
    examples = [Example("a", None, ["drama", "action"]), Example("b", None, [])]
    features = encode_examples(tokenizer, examples, max_length=8, task_type="multilabel", label_vocab=vocab)
    assert [f.label.tolist() for f in features] == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(DataError, match=r"dev.jsonl has labels the training data does not: 'horror'"):
        encode_examples(
            tokenizer,
            [Example("c", None, ["horror"])],
            max_length=8,
            task_type="multilabel",
            label_vocab=vocab,
            source="dev.jsonl",
        )


# ---------------------------------------------------------------------------------------------------
# Batching


def spread(batches, lengths):
    return np.mean([lengths[b].max() - lengths[b].min() for b in batches])


def test_train_batches_group_by_length_and_cover_every_example():
    lengths = np.random.default_rng(0).integers(5, 200, size=1003)
    batches = train_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert [len(b) for b in batches].count(8) == 125 and min(len(b) for b in batches) == 3
    # Sorted within chunks of 400, a batch spans about 195 * 8 / 400 = 4 lengths; shuffled, about 150.
    assert spread(batches, lengths) < 8
    assert spread([list(range(i, i + 8)) for i in range(0, 1000, 8)], lengths) > 100
    # Batches come in shuffled order, not longest first.
    assert abs(np.corrcoef(np.arange(len(batches)), [lengths[b].mean() for b in batches])[0, 1]) < 0.3


def test_train_batches_depend_only_on_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(5, 200, size=500)
    first = train_batches(lengths, 8, seed=1, epoch=3)
    assert train_batches(list(lengths), 8, seed=1, epoch=3) == first
    assert train_batches(lengths, 8, seed=1, epoch=4) != first
    assert train_batches(lengths, 8, seed=2, epoch=3) != first
    assert train_batches(lengths, 8, seed=1, epoch=3, skip=20) == first[20:]


def test_train_batches_ddp_ranks_disjoint_covering_and_in_step():
    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    per_rank = [train_batches(lengths, 8, seed=0, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every rank
    everything = [i for batches in per_rank for b in batches for i in b]
    assert sorted(everything) == list(range(1000))
    # At each step the ranks hold examples of similar length, so none waits long for the others.
    for step in zip(*per_rank):
        assert np.ptp([lengths[b].mean() for b in step]) < 20
    skipped = [train_batches(lengths, 8, seed=0, epoch=1, rank=r, world_size=3, skip=7) for r in range(3)]
    assert skipped == [batches[7:] for batches in per_rank]


def test_train_batches_small_last_step_joins_the_one_before():
    lengths = np.arange(98)  # 3 steps of 4 ranks x 8, then 2 examples: too few for 4 ranks
    per_rank = [train_batches(lengths, 8, seed=0, epoch=0, rank=r, world_size=4) for r in range(4)]
    assert [len(batches) for batches in per_rank] == [3, 3, 3, 3]
    assert sorted(len(b) for batches in per_rank for b in batches) == [8] * 10 + [9] * 2
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(98))
    with pytest.raises(DataError, match="3 training examples cannot be shared among 4"):
        train_batches([1, 2, 3], 8, seed=0, epoch=0, world_size=4)


def test_eval_batches_sorted_and_restored_to_original_order():
    lengths = [3, 9, 1, 7, 5]
    batches = eval_batches(lengths, 2)
    assert batches == [[1, 3], [4, 0], [2]]
    outputs = [[lengths[i] * 10 for i in b] for b in batches]  # what a model would return per batch
    assert in_original_order(batches, outputs) == [30, 90, 10, 70, 50]
    assert eval_batches(lengths, 2, rank=1, world_size=2) == [[4, 0]]


def test_collate_pads_to_the_longest():
    features = [
        Features(np.array([101, 7, 102], np.int32), np.array([0, 0, 0], np.int8), 1),
        Features(np.array([101, 7, 102, 8, 102], np.int32), np.array([0, 0, 0, 1, 1], np.int8), 0),
    ]
    batch = collate(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[101, 7, 102, 0, 0], [101, 7, 102, 8, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(batch[k].dtype == torch.long for k in batch)


def test_collate_labels_of_each_task():
    ids, types = np.array([101, 102], np.int32), np.zeros(2, np.int8)
    regression = collate([Features(ids, types, 0.5), Features(ids, types, -2.0)], 0)["labels"]
    assert regression.dtype == torch.float32 and regression.tolist() == [0.5, -2.0]
    hot = collate([Features(ids, types, np.array([1, 0, 1], np.float32))] * 2, 0)["labels"]
    assert hot.dtype == torch.float32 and hot.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    tags = collate(
        [
            Features(ids, types, np.array([-100, -100])),
            Features(np.array([101, 5, 102]), np.zeros(3), np.array([-100, 4, -100])),
        ],
        0,
    )["labels"]
    assert tags.dtype == torch.long and tags.tolist() == [[-100, -100, IGNORE_INDEX], [-100, 4, -100]]
    assert "labels" not in collate([Features(ids, types, None)], 0)


def test_encode_then_collate_gives_what_transformers_tokenizer_gives(tokenizer):
    """Texts, and pairs with one cut by max_length: each batch is transformers' BertTokenizer's (the slow,
    pure-Python one, an independent implementation) with padding and longest-first truncation."""
    import transformers

    reference = transformers.BertTokenizer(str(assets.minilm_dir() / "vocab.txt"), do_lower_case=True)
    vocab = LabelVocab(["negative", "positive"])
    for examples in ([Example("a fine film", None, "positive"), Example("Dull!", None, "negative")],
                     [Example("Dull!", "a tedious, overlong mess of a plot", "negative"),
                      Example("The acting was wonderful", "and the story too", "positive")]):
        features = encode_examples(tokenizer, examples, max_length=12, task_type="classification", label_vocab=vocab)
        batch = collate(features, pad_token_id=tokenizer.token_to_id("[PAD]"))
        pairs = [e.text_pair for e in examples] if examples[0].text_pair else None
        expected = reference([e.text for e in examples], pairs, max_length=12, truncation="longest_first", padding=True)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert batch[key].tolist() == expected[key], key
        assert batch["labels"].tolist() == [vocab.labels.index(e.label) for e in examples]


# ---------------------------------------------------------------------------------------------------
# Built-in tasks


def test_movie_reviews_split_is_fixed():
    train, validation, test = movie_reviews("classification")
    assert (len(train), len(validation), len(test)) == (8391, 1105, 1072)  # 10,605 less the 37 rated 0
    assert {ex.label for ex in train} == {"negative", "positive"}
    assert sum(ex.label == "positive" for ex in train) == 4157
    assert train[0] == Example(
        "The Rock is destined to be the 21st Century's new ''Conan'' and that he's going to make a splash even "
        "greater than Arnold Schwarzenegger, Jean Claud Van Damme or Steven Segal.",
        None,
        "positive",
    )
    assert len({ex.text for ex in train} & {ex.text for ex in validation + test}) < 10  # a few repeated sentences
    assert movie_reviews("classification")[1] == validation
    train_r, validation_r, test_r = movie_reviews("regression")
    assert (len(train_r), len(validation_r), len(test_r)) == (8415, 1112, 1078)
    assert sum(ex.label == 0 for ex in train_r + validation_r + test_r) == 37
    assert train_r[0].label == 2.26666666667
    # The same sentences in each split, whatever the task: classification only drops the zeros.
    assert [ex.text for ex in validation_r if ex.label != 0] == [ex.text for ex in validation]


def tsv(*rows):
    return "".join("\t".join(row) + "\n" for row in rows)


# The header rows of the real GLUE files; two data rows each, with the quotes GLUE's texts hold.
STSB = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2")
MNLI = tuple(
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2".split()
)
GLUE_FILES = {  # task: (train and dev file, test file)
    "cola": (
        tsv(("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."),
            ("gj04", "0", "*", 'One more pseudo generalization and I\'m giving up "')),  # no header
        tsv(("index", "sentence"), ("0", "Bill whistled past the house.")),
    ),
    "sst2": (
        tsv(("sentence", "label"), ('it \'s a "charming film ', "1"), ("unflinchingly bleak ", "0")),
        tsv(("index", "sentence"), ("0", "uneasy mishmash")),
    ),
    "mrpc": (
        tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            ("1", "702876", "702977", "Amrozi accused his brother .", "Referring to him ."),
            ("0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .")),
        tsv(("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            ("0", "1089874", "1089925", "PCCW 's chief .", "Current Chief .")),
    ),
    "qqp": (
        tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            ("133273", "213221", "213222", "How is life?", "What is life?", "0"),
            ("402555", "536040", "536041", 'How do I "control" anger?', "How to control anger?", "1")),
        tsv(("id", "question1", "question2"), ("0", "Why?", "How?")),
    ),
    "stsb": (
        tsv(STSB + ("score",),
            ("0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
             "An air plane is taking off.", "5.000"),
            ("1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man plays a flute.",
             "A man plays a big flute.", "3.800")),
        tsv(STSB, ("0", "main-captions", "MSRvid", "2012test", "0024", "none", "none", "A girl styles her hair.",
                   "A girl brushes her hair.")),
    ),
    "mnli": (
        tsv(MNLI + ("label1", "gold_label"),
            ("0", "31193", "31193n", "government", "( ( a ) )", "( b )", "(ROOT a)", "(ROOT b)",
             "Conceptually cream skimming .", "Product and geography .", "neutral", "neutral"),
            ("1", "101457", "101457e", "telephone", "( c )", "( d )", "(ROOT c)", "(ROOT d)", 'you know "during',
             "You lose .", "entailment", "entailment")),
        tsv(MNLI, ("0", "31193", "31193n", "government", "( a )", "( b )", "(ROOT a)", "(ROOT b)", "Hi .", "Bye .")),
    ),
    "qnli": (
        tsv(("index", "question", "sentence", "label"), ("0", "When?", "In 1990.", "entailment"),
            ("1", "Who?", 'Nobody "knows.', "not_entailment")),
        tsv(("index", "question", "sentence"), ("0", "What?", "This.")),
    ),
    "rte": (
        tsv(("index", "sentence1", "sentence2", "label"),
            ("0", "No weapons found.", "Weapons found.", "not_entailment"), ("1", "A b.", "A.", "entailment")),
        tsv(("index", "sentence1", "sentence2"), ("0", "Maude died.", "Maude is dead.")),
    ),
    "wnli": (
        tsv(("index", "sentence1", "sentence2", "label"), ("0", "I stuck a pin.", "The pin had a hole.", "0"),
            ("1", "John hit Bill.", "John hit.", "1")),
        tsv(("index", "sentence1", "sentence2"), ("0", "Maude died.", "She is dead.")),
    ),
}  # fmt: skip
GLUE_FIRST_TWO = {  # (text, text_pair, label) of the two training rows above, read by hand
    "cola": [("Our friends won't buy this analysis, let alone the next one we propose.", None, "1"),
             ('One more pseudo generalization and I\'m giving up "', None, "0")],
    "sst2": [('it \'s a "charming film ', None, "1"), ("unflinchingly bleak ", None, "0")],
    "mrpc": [("Amrozi accused his brother .", "Referring to him .", "1"),
             ("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", "0")],
    "qqp": [("How is life?", "What is life?", "0"), ('How do I "control" anger?', "How to control anger?", "1")],
    "stsb": [("A plane is taking off.", "An air plane is taking off.", 5.0),
             ("A man plays a flute.", "A man plays a big flute.", 3.8)],
    "mnli": [("Conceptually cream skimming .", "Product and geography .", "neutral"),
             ('you know "during', "You lose .", "entailment")],
    "qnli": [("When?", "In 1990.", "entailment"), ("Who?", 'Nobody "knows.', "not_entailment")],
    "rte": [("No weapons found.", "Weapons found.", "not_entailment"), ("A b.", "A.", "entailment")],
    "wnli": [("I stuck a pin.", "The pin had a hole.", "0"), ("John hit Bill.", "John hit.", "1")],
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(GLUE_FILES))
def test_load_glue_reads_the_real_layouts(tmp_path, task):
    spec = GLUE_TASKS[task]
    labelled, test_text = GLUE_FILES[task]
    for name in (spec.train_file, spec.validation_file):
        write(tmp_path / "glue_data" / spec.directory, name, labelled)
    write(tmp_path / "glue_data" / spec.directory, spec.test_file, test_text)
    train, validation, test, loaded_spec = load_glue(task, tmp_path / "glue_data")  # the folder above works too
    assert loaded_spec == spec
    assert [(ex.text, ex.text_pair, ex.label) for ex in train] == GLUE_FIRST_TWO[task]
    assert validation == train
    assert len(test) == 1 and test[0].label is None and test[0].text
    if spec.labels is not None:
        assert {ex.label for ex in train} <= set(spec.labels)
        every_label = [Example("x", None, label) for label in reversed(spec.labels)]
        assert LabelVocab.from_examples(every_label, spec.task_type).labels == list(spec.labels)  # sorted = HF's order


# The GLUE benchmark as published, written out here independently of GLUE_TASKS: the metric each task is
# scored by (Wang et al. 2019, Table 1) and the one the BERT paper reports (Devlin et al. 2019, Table 1:
# "F1 scores are reported for QQP and MRPC, Spearman correlations are reported for STS-B, and accuracy
# scores are reported for the other tasks"; CoLA by Matthews correlation), the number of classes, and the
# validation file of the GLUE download.
GLUE_AS_PUBLISHED = {
    "cola": ({"mcc"}, "mcc", 2, "dev.tsv"),
    "sst2": ({"accuracy"}, "accuracy", 2, "dev.tsv"),
    "mrpc": ({"accuracy", "f1"}, "f1", 2, "dev.tsv"),
    "qqp": ({"accuracy", "f1"}, "f1", 2, "dev.tsv"),
    "stsb": ({"pearson", "spearman"}, "spearman", None, "dev.tsv"),
    "mnli": ({"accuracy"}, "accuracy", 3, "dev_matched.tsv"),
    "mnli-mm": ({"accuracy"}, "accuracy", 3, "dev_mismatched.tsv"),
    "qnli": ({"accuracy"}, "accuracy", 2, "dev.tsv"),
    "rte": ({"accuracy"}, "accuracy", 2, "dev.tsv"),
    "wnli": ({"accuracy"}, "accuracy", 2, "dev.tsv"),
}


def test_glue_tasks_are_scored_as_published():
    assert set(GLUE_TASKS) == set(GLUE_AS_PUBLISHED)
    for task, (metrics, main, classes, validation_file) in GLUE_AS_PUBLISHED.items():
        spec = GLUE_TASKS[task]
        found = (set(spec.metrics), spec.main_metric, None if spec.labels is None else len(spec.labels), spec.validation_file)
        assert found == (metrics, main, classes, validation_file), task
        assert (spec.task_type == "regression") == (classes is None), task


def test_load_glue_errors(tmp_path):
    with pytest.raises(DataError, match="unknown GLUE task 'sst5'"):
        load_glue("sst5", tmp_path)
    write(tmp_path, "train.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(DataError, match=r"GLUE sst2 needs train.tsv and dev.tsv .*dev.tsv is missing"):
        load_glue("sst2", tmp_path)
    write(tmp_path, "dev.tsv", "sentence\tlabel\nb\t0\n")
    assert load_glue("sst2", tmp_path)[2] is None  # no test file


def test_empty_texts_are_kept_with_a_warning(tmp_path, caplog):
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,pos\n,neg\n  ,neg\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        examples = load_examples(path, task_type="classification")
    assert [e.text.strip() for e in examples] == ["good", "", ""]
    assert "2 example(s) with an empty text (the first at line 3)" in caplog.text


def test_text_the_tokenizer_cannot_spell_is_warned_about(tokenizer, caplog):
    """A broken vocabulary (transformers 5's BertTokenizerFast(vocab_file=...) pitfall) or another script turns
    most pieces into [UNK]: training would run on nothing, so say so."""
    vocab = LabelVocab(["0", "1"])
    english = [Example("the cat sat on the mat", None, "0"), Example("a good film", None, "1")]
    encode_examples(tokenizer, english, max_length=32, task_type="classification", label_vocab=vocab, source="the training data")
    assert "[UNK]" not in caplog.text
    unknown = [Example("⟡⟡ ⟢⟢ ⟣⟣", None, "0"), Example("⟤ ⟥ ok", None, "1")]
    encode_examples(tokenizer, unknown, max_length=32, task_type="classification", label_vocab=vocab, source="the training data")
    assert "83% of the word pieces of the training data are [UNK]" in caplog.text


# ----------------------------------------------------------------------------- readers, the cases mutmut found unchecked


def test_span_annotated_json_is_tagged_on_the_tokenizers_words(tmp_path, tokenizer):
    import json

    text = "Jim Henson met Ann in Paris."
    records = [{"text": text, "spans": [{"start": 0, "end": 10, "label": "PER"}, {"start": 22, "end": 27, "label": "LOC"}]},
               {"text": "Nothing here.", "spans": []}]
    path = write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    first, second = load_examples(path, task_type="token-classification", tokenizer=tokenizer)
    assert (first.text, first.text_pair) == (["Jim", "Henson", "met", "Ann", "in", "Paris", "."], None)
    assert first.label == ["B-PER", "I-PER", "O", "O", "O", "B-LOC", "O"]
    assert (first.tagged_text.text, first.tagged_text.record, first.tagged_text.fmt) == (text, records[0], "minibert")
    assert first.tagged_text.offsets[:2] == [(0, 3), (4, 10)]
    assert (second.text, second.label) == (["Nothing", "here", "."], ["O", "O", "O"])
    bioes = load_examples(path, task_type="token-classification", tokenizer=tokenizer, tag_scheme="bioes")
    assert bioes[0].label == ["B-PER", "E-PER", "O", "O", "O", "S-LOC", "O"]
    with pytest.raises(ValueError, match="span-annotated text is split into words by the tokenizer: pass tokenizer="):
        load_examples(path, task_type="token-classification")
    # A text without spans: refused in training data, read for prediction.
    partly = write(tmp_path, "test.jsonl", json.dumps(records[0]) + "\n" + json.dumps({"text": "Ann left."}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl line 2 has no spans: give every text its spans \(\[\] when"):
        load_examples(partly, task_type="token-classification", tokenizer=tokenizer)
    unlabelled = write(tmp_path, "predict.jsonl", json.dumps({"text": "Ann left."}) + "\n")
    (ann,) = load_examples(unlabelled, task_type="token-classification", tokenizer=tokenizer, require_labels=False)
    assert (ann.text, ann.label) == (["Ann", "left", "."], None)
    off = write(tmp_path, "off.jsonl", json.dumps({"text": "Obamas", "spans": [{"start": 0, "end": 5, "label": "PER"}]}))
    with pytest.raises(ValueError, match=r"off.jsonl line 1: the span 0..5 'Obama' \(PER\) ends inside the word"):
        load_examples(off, task_type="token-classification", tokenizer=tokenizer)


def test_word_lists_in_a_doccano_shaped_record_are_words_not_spans(tmp_path, tokenizer):
    """{"text": [...], "label": [...]} is doccano's shape, but a list of words under the text column is words."""
    path = write(tmp_path, "train.jsonl", '{"text": ["EU", "rejects"], "label": ["B-ORG", "O"]}\n')
    examples = load_examples(path, task_type="token-classification", text_column="text", label_column="label",
                             tokenizer=tokenizer)
    assert examples == [Example(["EU", "rejects"], None, ["B-ORG", "O"])]
    # Word lists beside a raw text: the words (under the text column, "tokens") are read, not the text.
    both = write(tmp_path, "both.jsonl", '{"text": "EU rejects", "tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n')
    assert load_examples(both, task_type="token-classification", tokenizer=tokenizer) == examples


def test_table_lines_that_are_examples_and_lines_that_are_skipped(tmp_path):
    # A one-column CSV: a quoted "" is an empty text (kept), a blank line is nothing.
    one_column = write(tmp_path, "test.csv", 'text\n""\n\nabc\n')
    assert load_examples(one_column, task_type="classification", require_labels=False) == [Example(""), Example("abc")]
    # Two empty cells are a row, with an empty label: refused, in CSV and TSV alike.
    for name, text in (("train.csv", "text,label\ngood,1\n,\n"), ("train.tsv", "text\tlabel\ngood\t1\n\t\n")):
        with pytest.raises(DataError, match=rf"{name} line 3: empty label in column 'label'"):
            load_examples(write(tmp_path, name, text), task_type="classification")
    one_column_tsv = write(tmp_path, "test.tsv", "text\nhello\n \n")
    assert load_examples(one_column_tsv, task_type="classification", require_labels=False) == [Example("hello")]
    # A TSV row ending in an empty cell keeps it (the line ending is cut, not the tab).
    trailing = write(tmp_path, "unlabelled.tsv", "text\tlabel\nhello\t\r\n")
    assert load_examples(trailing, task_type="classification", require_labels=False) == [Example("hello")]
    # A lone carriage return (old Mac line endings, or one inside a text) is what the csv module refuses.
    for text in ("text,label\na\rb,1\n", "text,label\ra,1\rb,0\r"):
        broken = write(tmp_path, "broken.csv", text)
        with pytest.raises(DataError, match=r"broken\.csv line \d: a carriage return \(\\r\) inside a cell that is not "
                                            r"quoted: quote the cell, or save the file with \\n or \\r\\n line endings$"):
            load_examples(broken, task_type="classification")


def test_a_missing_label_column_is_named_with_the_header_hint(tmp_path):
    path = write(tmp_path, "train.csv", "text,stars\na,1\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} has no column 'label' \(columns: 'text', 'stars'\) "
                                        r"\(the first line is read as the header\); choose one with --label-column$"):
        load_examples(path, task_type="classification")
    headless = write(tmp_path, "headless.csv", "a,1\n")
    with pytest.raises(DataError, match=r"has no column 'label' \(columns: 'text', 'score'\); choose one with --label-column$"):
        load_examples(headless, task_type="classification", column_names=["text", "score"])
    with pytest.raises(DataError, match=rf"^no such file: {re.escape(str(tmp_path / 'nothing.csv'))}$"):
        load_examples(tmp_path / "nothing.csv", task_type="classification")


def test_conll_columns_tabs_and_mixed_tags(tmp_path):
    # Tab-separated: a word may hold a space, and an empty middle column is only a column.
    tabs = write(tmp_path, "train.conll", "New York\tNNP\tB-LOC\nis\t\tO\n")
    assert load_examples(tabs, task_type="token-classification") == [Example(["New York", "is"], None, ["B-LOC", "O"])]
    mixed = write(tmp_path, "test.conll", "Peter B-PER\nBlackburn\n")
    with pytest.raises(DataError, match=r"test.conll line 2: some words of this sentence have a tag and some do not"):
        load_examples(mixed, task_type="token-classification", require_labels=False)
    latin1 = write(tmp_path, "latin1.conll", "café O\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"latin1\.conll"):
        load_examples(latin1, task_type="token-classification")


def test_json_pairs_and_token_records_name_where_they_are_wrong(tmp_path):
    pairs = write(tmp_path, "dev.jsonl", '{"premise": "a", "hypothesis": "b", "label": 1}\n')
    assert load_examples(pairs, task_type="classification", text_column="premise", text_pair_column="hypothesis") == [
        Example("a", "b", "1")]
    bad_pair = write(tmp_path, "bad.jsonl", '{"premise": "a", "hypothesis": 3, "label": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 1: 'hypothesis' must be a string, found 3$"):
        load_examples(bad_pair, task_type="classification", text_column="premise", text_pair_column="hypothesis")
    for record, message in (
        ('{"tokens": ["EU", " "], "tags": ["O", "O"]}', r"line 1: the words must be a list of non-empty strings, found \['EU', ' '\]"),
        ('{"tokens": ["EU"], "tags": "O"}', r"line 1: 1 words but tags 'O'; give one tag per word"),
        ('{"tokens": ["EU", "x"], "tags": ["O"]}', r"t.jsonl line 1: 2 words but 1 tags"),
        ('{"tokens": ["EU"], "tags": [null]}', r"t.jsonl line 1"),
    ):
        with pytest.raises(DataError, match=message):
            load_examples(write(tmp_path, "t.jsonl", record + "\n"), task_type="token-classification")


@pytest.mark.parametrize("text, expected", [
    ("", ("classification", "default")),  # an empty file
    ('{"text": "a b", "tokens": ["a", "b"], "label": "x"}\n', NOT_NUMBERS),  # "text" is the text column when it is there
    ('{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n', SCORES),  # the first record's label counts too
])
def test_infer_task_type_of_json_records(tmp_path, text, expected):
    assert infer_task_type(write(tmp_path, "train.jsonl", text)) == expected


# ----------------------------------------------------------------------------- encoding, by hand-computed ids

NUMBERS = "one two three four five six seven eight nine ten"  # one piece each: ids 2028 ... 2702


def piece_ids(tokenizer, words):
    return [tokenizer.token_to_id(w) for w in words.split()]


def test_sliding_windows_share_stride_tokens_and_keep_label_and_document(tokenizer, caplog):
    """max_length 6 holds 4 text tokens; stride 2: windows start every 2 tokens, the last holds the rest."""
    ten, cls, sep = piece_ids(tokenizer, NUMBERS), 101, 102
    examples = [Example(NUMBERS, None, 1.5), Example("one two", None, -2.0), Example(NUMBERS[:-4], None, 3.0)]
    with caplog.at_level(logging.INFO, logger="minibert.data"):
        features = encode_examples(tokenizer, examples, max_length=6, task_type="regression", stride=2,
                                   source="train.csv")
    expected = [ten[0:4], ten[2:6], ten[4:8], ten[6:10], ten[0:2], ten[0:4], ten[2:6], ten[4:8], ten[6:9]]
    assert [f.input_ids.tolist() for f in features] == [[cls, *w, sep] for w in expected]
    assert [f.document for f in features] == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    assert [f.label for f in features] == [1.5] * 4 + [-2.0] + [3.0] * 4
    assert all(f.input_ids.dtype == np.int32 and f.token_type_ids.dtype == np.int8 for f in features)
    assert ("2 of 3 examples in train.csv are longer than max_length=6 tokens: read in 9 windows that share 2 tokens"
            in caplog.text)


def test_sliding_windows_of_a_pair_pair_every_window_of_each_text(tokenizer):
    """A pair whose two texts both overflow: the tokenizer's overflow gives each window of A with each window of B."""
    a, b = piece_ids(tokenizer, "one two three four five six"), piece_ids(tokenizer, "seven eight nine ten")
    features = encode_examples(tokenizer, [Example("one two three four five six", "seven eight nine ten", 0.0)],
                               max_length=7, task_type="regression", stride=1)
    # 4 text tokens a window, 2 per text; A's windows [1 2] [2 3] [3 4] [4 5] [5 6], B's [7 8] [8 9] [9 10].
    windows_a = [a[i:i + 2] for i in range(5)]
    windows_b = [b[i:i + 2] for i in range(3)]
    got = {(tuple(f.input_ids[1:3]), tuple(f.input_ids[4:6])) for f in features}
    assert got == {(tuple(x), tuple(y)) for x in windows_a for y in windows_b}
    assert all(f.token_type_ids.tolist() == [0, 0, 0, 0, 1, 1, 1] and f.document == 0 for f in features)


def test_token_windows_tag_only_the_first_piece_of_a_word_split_between_windows(tokenizer):
    """paris johan ##son johan ##son left: 3 text tokens a window, stride 1, so windows start at pieces 0, 2, 4;
    the windows that start on ##son continue the word before them, whose tag lies in the window before."""
    words = ["Paris", "Johanson", "Johanson", "left"]
    vocab = LabelVocab(["B-LOC", "B-PER", "O"])
    features = encode_examples(tokenizer, [Example(words, None, ["B-LOC", "B-PER", "B-PER", "O"])], max_length=5,
                               task_type="token-classification", label_vocab=vocab, stride=1)
    tokens = [[tokenizer.id_to_token(i) for i in f.input_ids[1:-1]] for f in features]
    assert tokens == [["paris", "johan", "##son"], ["##son", "johan", "##son"], ["##son", "left"]]
    assert [f.word_ids.tolist() for f in features] == [[-1, 0, 1, -1, -1], [-1, -1, 2, -1, -1], [-1, -1, 3, -1]]
    assert [f.label.tolist() for f in features] == [[-100, 0, 1, -100, -100], [-100, -100, 1, -100, -100],
                                                    [-100, -100, 2, -100]]
    assert all(f.word_ids.dtype == np.int32 and f.label.dtype == np.int64 for f in features)
    # Windows without overlap (stride 0), two text tokens each: [paris johan] [##son johan] [##son left].
    features = encode_examples(tokenizer, [Example(words, None, ["B-LOC", "B-PER", "B-PER", "O"])], max_length=4,
                               task_type="token-classification", label_vocab=vocab, stride=0)
    assert [f.word_ids.tolist() for f in features] == [[-1, 0, 1, -1], [-1, -1, 2, -1], [-1, -1, 3, -1]]


def test_token_truncation_counts_the_lost_words_of_every_sentence(tokenizer, caplog):
    vocab = LabelVocab(["B-LOC", "B-PER", "O"])
    examples = [Example(["Johanson", "visited", "Paris", "today"], None, ["B-PER", "O", "B-LOC", "O"]),  # loses 2
                Example(["Paris", "Paris", "Paris", "Paris", "Paris"], None, ["B-LOC"] * 5),  # loses 2
                Example(["Paris"], None, ["B-LOC"])]
    with caplog.at_level(logging.WARNING, logger="minibert.data"):
        encode_examples(tokenizer, examples, max_length=5, task_type="token-classification", label_vocab=vocab)
    assert "2 of 3 sentences in the data are longer than max_length=5 tokens: their last 4 words get no tag" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minibert.data"):
        encode_examples(tokenizer, examples[2:], max_length=5, task_type="token-classification", label_vocab=vocab)
        encode_examples(tokenizer, [Example("one two three", None, 0.0), Example("one", None, 0.0)], max_length=4,
                        task_type="regression", source="dev.csv")
    assert caplog.messages == ["minibert: 1 of 2 examples in dev.csv were cut to max_length=4 tokens "
                               "(--sliding-window reads them whole)"]


def test_encode_refusals_name_what_is_wrong(tokenizer):
    vocab = LabelVocab(["a", "b"])
    with pytest.raises(DataError, match="^dev.csv has no examples$"):
        encode_examples(tokenizer, [], max_length=8, task_type="classification", label_vocab=vocab, source="dev.csv")
    with pytest.raises(DataError, match="^dev.csv mixes examples with and without a text pair$"):
        encode_examples(tokenizer, [Example("a", "b", "a"), Example("a", None, "b")], max_length=8,
                        task_type="classification", label_vocab=vocab, source="dev.csv")
    with pytest.raises(ValueError, match="^multilabel needs a label_vocab to turn labels into ids$"):
        encode_examples(tokenizer, [Example("a", None, ["a"])], max_length=8, task_type="multilabel")
    # A pair needs 3 special tokens and a token of each text: 5 at least.
    pair = [Example("one", "two", 1.0)]
    assert encode_examples(tokenizer, pair, max_length=5, task_type="regression")[0].input_ids.tolist() == [
        101, 2028, 102, 2048, 102]
    with pytest.raises(ValueError, match="max_length=4 leaves no room for text after 3 special tokens"):
        encode_examples(tokenizer, pair, max_length=4, task_type="regression")
    # The stride must leave new text in each window: less than 14 text tokens of max_length 16, 6 per text of a pair.
    with pytest.raises(ValueError, match="stride 14 must be at least 0 and less than 14, the text tokens a window of "
                                         "max_length 16 holds: "):
        encode_examples(tokenizer, [Example("one", None, 1.0)], max_length=16, task_type="regression", stride=14)
    with pytest.raises(ValueError, match="less than 6, the text tokens a window of max_length 16 holds per text of a pair"):
        encode_examples(tokenizer, pair, max_length=16, task_type="regression", stride=6)
    assert len(encode_examples(tokenizer, pair, max_length=16, task_type="regression", stride=5)) == 1


def test_multilabel_features_are_float32_multi_hot(tokenizer):
    vocab = LabelVocab(["action", "comedy", "drama"])
    (features,) = encode_examples(tokenizer, [Example("a", None, ["drama", "action"])], max_length=8,
                                  task_type="multilabel", label_vocab=vocab)
    assert features.label.dtype == np.float32 and features.label.tolist() == [1.0, 0.0, 1.0]


def test_a_tokenizer_already_set_up_is_used_as_it_is_and_padding_is_never_kept(tokenizer):
    from minibert.data.encoding import truncating_tokenizer

    prepared = truncating_tokenizer(tokenizer, 16, 2)
    assert prepared is not tokenizer and truncating_tokenizer(prepared, 16, 2) is prepared
    assert prepared.truncation == {"max_length": 16, "stride": 2, "strategy": "longest_first", "direction": "right"}
    padded = Tokenizer.from_str(prepared.to_str())
    padded.enable_padding(length=16)
    assert truncating_tokenizer(padded, 16, 2) is not padded
    (features,) = encode_examples(padded, [Example("one", None, 1.0)], max_length=16, task_type="regression")
    assert features.input_ids.tolist() == [101, 2028, 102]


def test_a_half_unknown_text_is_not_warned_about(tokenizer, caplog):
    """The [UNK] warning is for more than half of the word pieces: [UNK] cat is half."""
    encode_examples(tokenizer, [Example("⟡ cat", None, 1.0)], max_length=8, task_type="regression")
    assert "[UNK]" not in caplog.text
    encode_examples(tokenizer, [Example("⟡ ⟡ cat", None, 1.0)], max_length=8, task_type="regression")
    assert "67% of the word pieces of the data are [UNK]" in caplog.text


# ----------------------------------------------------------------------------- batching, by its stated rules


def test_train_batches_sort_within_chunks_of_the_shuffled_order():
    """chunk_batches=1: each batch is one consecutive chunk of the epoch's permutation (seeded by seed and
    epoch), longest first; so the batches change from epoch to epoch yet hold similar lengths."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 60)
    batches = train_batches(lengths, 6, seed=3, epoch=1, chunk_batches=1)
    order = np.random.default_rng([3, 1]).permutation(60)
    chunks = {frozenset(order[i:i + 6].tolist()) for i in range(0, 60, 6)}
    assert {frozenset(b) for b in batches} == chunks
    for b in batches:
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)
    grouped = train_batches(lengths, 6, seed=3, epoch=1)  # chunks of 50 steps: the whole epoch, sorted
    spread = max(int(np.ptp(lengths[b])) for b in grouped)
    assert spread < 25 and spread < int(np.ptp(lengths))  # similar lengths in every batch


@pytest.mark.parametrize("n, world_size, batch_size, per_rank", [
    (5, 2, 2, [[3], [2]]),  # steps of 4 and 1: the 1 joins the step before, so both ranks get a batch
    (6, 2, 2, [[2, 1], [2, 1]]),  # steps of 4 and 2: one example a rank is enough, no merge
    (2, 2, 1, [[1], [1]]),  # as many examples as ranks
    (9, 1, 1, [[1] * 9]),  # batch size 1
])
def test_train_batches_share_every_example_once_with_as_many_batches_on_every_rank(n, world_size, batch_size, per_rank):
    lengths = np.arange(n) + 1
    shares = [train_batches(lengths, batch_size, seed=0, epoch=0, rank=r, world_size=world_size) for r in range(world_size)]
    assert [sorted((len(b) for b in share), reverse=True) for share in shares] == per_rank
    assert sorted(i for share in shares for b in share for i in b) == list(range(n))


def test_train_batches_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="need batch_size >= 1"):
        train_batches([3, 4], 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"0 <= rank < world_size, got 2, 2, 2"):
        train_batches([3, 4, 5], 2, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="2 training examples cannot be shared among 3 processes"):
        train_batches([3, 4], 1, seed=0, epoch=0, rank=0, world_size=3)


def test_eval_batches_keep_the_input_order_among_equal_lengths():
    lengths = np.random.default_rng(1).integers(1, 4, 500)  # many ties: an unstable sort would reorder them
    expected = sorted(range(500), key=lambda i: -lengths[i])  # Python's sort is stable
    assert [i for b in eval_batches(lengths, 7) for i in b] == expected
    assert eval_batches(lengths, 7, rank=1, world_size=3) == eval_batches(lengths, 7)[1::3]


def test_collate_a_batch_of_one():
    ids, types = np.array([101, 7, 102], np.int32), np.array([0, 0, 0], np.int8)
    batch = collate([Features(ids, types, 2)], pad_token_id=0)
    assert batch["labels"].tolist() == [2] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[101, 7, 102]] and batch["attention_mask"].tolist() == [[1, 1, 1]]
