"""Shared test setup: offline hub, the Triton interpreter on machines without a GPU, small models."""

import os

# Before anything imports huggingface_hub or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up fails at once instead of retrying for ~23 s
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU through its interpreter
try:  # build the kernels now, while TRITON_INTERPRET is set: Triton reads it once, at import, and a test that
    import minibert.kernels.flash_attention  # noqa: F401  # unsets it (monkeypatch) must not decide that for the rest
except ImportError:  # no triton: the kernel tests skip
    pass

import pytest

torch.set_num_threads(min(2, torch.get_num_threads()))


# Sentiment texts of three to eight words for the end-to-end fine-tuning tests: six a class, so that a few
# steps can learn them, and lengths that mix the classes within a length-grouped batch.
POSITIVE = ["a wonderful , moving film", "great acting and a superb story", "i loved every minute", "brilliant and funny",
            "a warm , clever delight", "beautifully shot and well acted"]
NEGATIVE = ["a dull , boring mess", "terrible acting and a weak plot", "i hated every minute", "tedious and unfunny",
            "a cold , stupid bore", "ugly to look at and badly acted"]


def write_csv(path, rows, header=("text", "label")):
    """rows under a header as a UTF-8 CSV file (quoted where a field needs it); returns path."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tiny_hf_config(**overrides):
    """A transformers BertConfig small enough that a test runs in milliseconds, with sizes that are all
    different from each other so that a transposed or swapped weight cannot go unnoticed."""
    import transformers

    kwargs = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def padded_batch(vocab_size=99, lengths=(11, 7, 1, 9), seed=0):
    """input_ids, attention_mask (right-padded, with zeros) and token types with two segments."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    input_ids = torch.randint(5, vocab_size, (B, T), generator=g)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        attention_mask[b, :n] = 1
        token_type_ids[b, n // 2 : n] = 1
    input_ids[attention_mask == 0] = 0
    input_ids[:, 0] = 2  # a [CLS]-like first token
    return input_ids, attention_mask, token_type_ids


@pytest.fixture
def minilm_dir():
    from minibert.assets import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def tiny_init_dir(tmp_path_factory):
    """A tiny random BERT with the real uncased vocabulary and tokenizer files, as a local HF directory:
    a stand-in for bert-base-uncased that trains in milliseconds."""
    import shutil

    import transformers

    from minibert.assets import minilm_dir

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = tiny_hf_config(vocab_size=30522, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    transformers.BertModel(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, directory / name)
    return directory


class CreatesAFile:
    """What a crafted pickle can do on load: here, create a file (it could as well run any command).
    The tests that feed one to a loader check that the file never appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")
