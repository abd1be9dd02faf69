"""Checkpoints in every format HF uses, the real pretrained MiniLM, round trips, and bad input."""

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

import minibert
from conftest import CreatesAFile, padded_batch, tiny_hf_config
from minibert import BertConfig
from minibert.config import PRESETS
from minibert.checkpoint import ENCODER_MODULES, hf_to_minibert_key, minibert_to_hf_key, read_state_dict

ATOL = 1e-5


def hf_classifier(tmp_path, num_labels=3, seed=0):
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(tiny_hf_config(num_labels=num_labels)).eval()
    model.save_pretrained(tmp_path)
    return model


def logits_of(model, batch):
    ids, mask, types = batch
    if isinstance(model, transformers.PreTrainedModel):
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    return model(ids, attention_mask=mask, token_type_ids=types).logits


# ----------------------------------------------------------------------------- formats


def test_safetensors_and_bin_give_the_same_model(tmp_path):
    hf = hf_classifier(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    batch = padded_batch()
    expected = logits_of(hf, batch)
    for sub in ("st", "bin"):
        model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / sub)).eval()
        assert (logits_of(model, batch) - expected).abs().max() < ATOL


def test_legacy_gamma_beta_bin(tmp_path):
    """Old checkpoints (bert-base-uncased's pytorch_model.bin) name LayerNorm weights gamma/beta."""
    hf = hf_classifier(tmp_path / "src")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf.state_dict().items()}
    assert any(k.endswith("gamma") for k in legacy)
    (tmp_path / "legacy").mkdir()
    hf.config.save_pretrained(tmp_path / "legacy")
    torch.save(legacy, tmp_path / "legacy" / "pytorch_model.bin")
    model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "legacy")).eval()
    assert (logits_of(model, padded_batch()) - logits_of(hf, padded_batch())).abs().max() < ATOL


def test_sharded_safetensors(tmp_path):
    hf = hf_classifier(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "sharded")).eval()
    assert (logits_of(model, padded_batch()) - logits_of(hf, padded_batch())).abs().max() < ATOL


def test_encoder_checkpoint_into_classifier_reports_new_head(tmp_path, caplog):
    torch.manual_seed(0)
    hf = transformers.BertModel(tiny_hf_config()).eval()
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="minibert"):
        model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=4)
    assert model.new_keys == ["classifier.bias", "classifier.weight"]
    assert "newly initialised" in caplog.text and "classifier.weight" in caplog.text
    # the encoder is the checkpoint's, exactly
    ids, mask, types = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
    hidden, layout = model.eval().bert.encode(ids, mask, types)
    assert (model.bert.pooler(layout.first_tokens(hidden)) - ref).abs().max() < ATOL


def test_checkpoint_without_pooler_and_pretraining_heads_dropped(tmp_path, caplog):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(tiny_hf_config()).eval()
    hf.save_pretrained(tmp_path / "pt")
    with caplog.at_level(logging.WARNING, logger="minibert"):
        minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "pt"))
    assert "not used" in caplog.text and "cls.seq_relationship.* (2)" in caplog.text
    tok = transformers.BertForTokenClassification(tiny_hf_config(num_labels=3))
    tok.save_pretrained(tmp_path / "nopool")
    assert not any(k.startswith("bert.pooler") for k in read_state_dict(tmp_path / "nopool"))
    model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "nopool"))
    assert "bert.pooler.dense.weight" in model.new_keys


def test_key_table_covers_every_hf_bert_key():
    hf = transformers.BertForPreTraining(tiny_hf_config())
    mb = minibert.BertForPreTraining(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=37, max_position_embeddings=64))
    mb_keys = set(mb.state_dict())
    for key in hf.state_dict():
        target = hf_to_minibert_key(key, "bert.")
        assert target is None or target in mb_keys, key
    assert hf_to_minibert_key("bert.embeddings.position_ids", "bert.") is None
    assert hf_to_minibert_key("encoder.layer.11.output.LayerNorm.gamma", "") == "layers.11.feed_forward_norm.weight"
    assert "encoder.layer.{}.attention.self.query" in ENCODER_MODULES
    # ... and the other way: every weight of every minibert model has an HF name (a new weight needs a table line)
    config = mb.config.replace(num_labels=3)
    for model in (mb, minibert.BertModel(config), minibert.BertForSequenceClassification(config),
                  minibert.BertForTokenClassification(config)):
        prefix = "bert." if hasattr(model, "bert") else ""
        for key in model.state_dict():
            hf_key = minibert_to_hf_key(key, prefix)
            assert hf_key is None or hf_to_minibert_key(hf_key, prefix) == key, key


# ----------------------------------------------------------------------------- the real pretrained MiniLM

SENTENCES = [
    "The gorgeously elaborate continuation of ''The Lord of the Rings'' trilogy is so huge.",
    "Effective but too tepid biopic",
    "Ünïcödé, punctuation... and numbers like 3.14 aren't a problem!",
]


def test_minilm_hidden_states_and_tokenizer_equal_transformers(minilm_dir):
    hf_tok = transformers.BertTokenizer.from_pretrained(minilm_dir)
    tok = minibert.load_tokenizer(str(minilm_dir))
    encodings = tok.encode_batch(SENTENCES)
    for sentence, enc in zip(SENTENCES, encodings):
        assert enc.ids == hf_tok(sentence)["input_ids"], sentence
    pair = tok.encode(SENTENCES[0], SENTENCES[1])
    ref_pair = hf_tok(SENTENCES[0], SENTENCES[1])
    assert pair.ids == ref_pair["input_ids"] and pair.type_ids == ref_pair["token_type_ids"]

    hf_batch = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    hf = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    model = minibert.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        ref = hf(**hf_batch)
        out = model(hf_batch["input_ids"], hf_batch["attention_mask"], hf_batch["token_type_ids"])
    real = hf_batch["attention_mask"].bool()
    assert (ref.last_hidden_state[real] - out.last_hidden_state[real]).abs().max() < ATOL
    assert (ref.pooler_output - out.pooler_output).abs().max() < ATOL


def test_tokenizer_from_vocab_txt_only(tmp_path, minilm_dir):
    """A checkpoint with vocab.txt but no tokenizer.json (older hub models) tokenizes the same."""
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((minilm_dir / name).read_bytes())
    from_vocab = minibert.load_tokenizer(str(tmp_path))
    from_json = minibert.load_tokenizer(str(minilm_dir))
    for sentence in SENTENCES:
        assert from_vocab.encode(sentence).ids == from_json.encode(sentence).ids
    assert from_vocab.encode("a", "b").type_ids == [0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "mb_cls, auto_cls, kwargs",
    [
        (minibert.BertModel, transformers.AutoModel, {}),
        (minibert.BertForPreTraining, transformers.BertForPreTraining, {}),
        (minibert.BertForSequenceClassification, transformers.AutoModelForSequenceClassification,
         {"id2label": {0: "neg", 1: "neu", 2: "pos"}, "num_labels": 3}),
        (minibert.BertForTokenClassification, transformers.AutoModelForTokenClassification, {"num_labels": 5}),
    ],
)
def test_minibert_to_transformers(tmp_path, minilm_dir, mb_cls, auto_cls, kwargs):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64, **kwargs)
    model = mb_cls(cfg).eval()
    model.save_pretrained(tmp_path, tokenizer=None)
    hf, info = auto_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    ids, mask, types = padded_batch()
    out = model(ids, attention_mask=mask, token_type_ids=types)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    if mb_cls is minibert.BertModel:
        pairs = [(out.last_hidden_state[real], ref.last_hidden_state[real]), (out.pooler_output, ref.pooler_output)]
    elif mb_cls is minibert.BertForPreTraining:
        pairs = [(out.mlm_logits[real], ref.prediction_logits[real]), (out.nsp_logits, ref.seq_relationship_logits)]
    elif mb_cls is minibert.BertForTokenClassification:
        pairs = [(out.logits[real], ref.logits[real])]
    else:
        pairs = [(out.logits, ref.logits)]
        assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and hf.config.label2id["pos"] == 2
    for a, b in pairs:
        assert (a - b).abs().max() < ATOL
    assert hf.config.architectures == [mb_cls.__name__]


def test_transformers_to_minibert_and_back(tmp_path, minilm_dir):
    hf = hf_classifier(tmp_path / "hf")
    model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = minibert.load_tokenizer(str(minilm_dir))
    model.save_pretrained(tmp_path / "mb", tokenizer=tok)
    again = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "mb")).eval()
    batch = padded_batch()
    assert (logits_of(again, batch) - logits_of(hf, batch)).abs().max() < ATOL
    # the saved tokenizer loads in transformers and in minibert, with the same ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "mb")
    assert hf_tok(SENTENCES[0])["input_ids"] == minibert.load_tokenizer(str(tmp_path / "mb")).encode(SENTENCES[0]).ids
    # readable by others as any new file is (mkstemp alone would make them owner-only)
    (tmp_path / "plain").write_text("")
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert {mode(path) for path in (tmp_path / "mb").iterdir()} == {mode(tmp_path / "plain")}


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    hf_classifier(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["some_future_key"] = [1, 2]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = BertConfig.from_json_file(tmp_path / "config.json")
    assert cfg.extra["some_future_key"] == [1, 2] and cfg.num_labels == 3
    cfg.to_json_file(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["some_future_key"] == [1, 2] and again["hidden_size"] == 32 and again["id2label"]["2"] == "LABEL_2"


def test_presets():
    sizes = {name: (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)
             for name in ("tiny", "mini", "small", "medium", "base", "large") for c in [BertConfig.preset(name)]}
    assert sizes == {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024), "small": (4, 512, 8, 2048),
                     "medium": (8, 512, 8, 2048), "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)}
    # A preset may set its own heads and width; below hidden 64 there is still one head.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "micro", dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=4))
        c = BertConfig.preset("micro")
        assert (c.num_attention_heads, c.intermediate_size) == (4, 192)
        # Another width: heads and feed-forward follow it, not the preset's numbers for its own width.
        c = BertConfig.preset("micro", hidden_size=192)
        assert (c.num_attention_heads, c.intermediate_size) == (3, 768)
        c = BertConfig.preset("micro", hidden_size=192, num_attention_heads=6)
        assert (c.num_attention_heads, c.intermediate_size) == (6, 768)
    assert BertConfig.preset("tiny", hidden_size=32).num_attention_heads == 1


# ----------------------------------------------------------------------------- bad input


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such directory: ./does/not/exist"):
        minibert.BertModel.from_pretrained("./does/not/exist")


def test_hub_id_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache.*hf download bert-base-uncased"):
        minibert.BertModel.from_pretrained("bert-base-uncased")


def test_truncated_safetensors(tmp_path):
    hf_classifier(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="damaged or truncated"):
        minibert.BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_git_lfs_pointer_and_missing_shard(tmp_path):
    hf_classifier(tmp_path / "lfs")
    (tmp_path / "lfs" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1000\n")
    with pytest.raises(ValueError, match="Git LFS pointer.*git lfs pull"):
        minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "lfs"))
    torch.manual_seed(0)
    transformers.BertModel(tiny_hf_config()).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    next((tmp_path / "sharded").glob("model-0000*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lacks model-0000.*every file the index"):
        minibert.BertModel.from_pretrained(str(tmp_path / "sharded"))


def test_a_weights_file_that_would_run_code_is_refused_and_runs_none(tmp_path):
    hf = hf_classifier(tmp_path / "src")
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    marker = tmp_path / "created-by-the-pickle"
    torch.save({**hf.state_dict(), "payload": CreatesAFile(marker)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot read weights from .*pytorch_model.bin .*not a plain tensor file") as err:
        minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "bin"))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_saved_directory_is_what_transformers_tools_expect(tmp_path, minilm_dir):
    """Into a folder that does not exist yet: safetensors with the metadata transformers writes, default label
    names for a classifier without them, the tokenizer's model_max_length from the model's positions, and a
    dtype in config.json that names the weights as saved (fp32 here, though the config was read from fp16)."""
    from safetensors import safe_open

    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=48, num_labels=3)
    config.extra["torch_dtype"] = "float16"
    model = minibert.BertForSequenceClassification(config)
    out = tmp_path / "a" / "b"
    model.save_pretrained(out, tokenizer=minibert.load_tokenizer(minilm_dir))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "bert.embeddings.word_embeddings.weight" in f.keys() and "classifier.weight" in f.keys()
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"} and saved["torch_dtype"] == "float32"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 48
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and hf.dtype == torch.float32


def test_non_bert_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*BERT only"):
        minibert.BertModel.from_pretrained(str(tmp_path))


def test_head_shape_mismatch_and_reinit(tmp_path):
    """A head of another size is refused; with reinit_head the encoder is the checkpoint's (the same pooled
    output as transformers') and the head is new: BERT's N(0, 0.02) weights and zero bias."""
    hf = hf_classifier(tmp_path, num_labels=3)
    with pytest.raises(ValueError, match="classifier has 3 outputs but the model asks for 2.*reinit"):
        minibert.BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=2, id2label=None)
    torch.manual_seed(1)
    model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=2, id2label=None, reinit_head=True)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        hidden = model.eval()(ids, mask, types).logits - model.classifier.bias  # (B, 2) = pooled @ W.T
        torch.testing.assert_close(hidden, expected @ model.classifier.weight.T, atol=1e-5, rtol=0)
    weight = model.classifier.weight.detach()
    assert weight.shape == (2, 32) and abs(weight.std().item() - 0.02) < 0.006 and not model.classifier.bias.any()


def test_label_names_follow_the_number_of_labels(tmp_path):
    """A 3-label checkpoint loaded as a 2-label classifier once kept its 3 names for 2 outputs: the saved
    config made transformers build a 3-output head, and --predict-only named predictions wrongly."""
    torch.manual_seed(0)
    named = tiny_hf_config(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    transformers.BertForSequenceClassification(named).save_pretrained(tmp_path / "three")
    model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "three"), num_labels=2, reinit_head=True)
    assert model.config.num_labels == 2 and model.config.id2label is None
    model.save_pretrained(tmp_path / "two")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "two")
    assert reloaded.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert reloaded.classifier.out_features == 2
    # New names without a count set the count; the same count keeps the names.
    config = BertConfig.from_json_file(tmp_path / "three" / "config.json", id2label={0: "a", 1: "b"})
    assert config.num_labels == 2
    assert BertConfig.from_json_file(tmp_path / "three" / "config.json", num_labels=3).id2label == {0: "neg", 1: "neu", 2: "pos"}
    # Both given and at odds, or changed after construction: refused, never saved.
    with pytest.raises(ValueError, match="id2label names 3 labels but num_labels is 2"):
        BertConfig(num_labels=2, id2label={0: "a", 1: "b", 2: "c"})
    model.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    with pytest.raises(ValueError, match="id2label names 3 labels but num_labels is 2"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


def test_untied_mlm_decoder_is_refused_for_pretraining_and_ignored_for_fine_tuning(tmp_path):
    """minibert's MLM head reuses the word embeddings; a decoder of its own must not be silently replaced."""
    torch.manual_seed(0)
    transformers.BertForMaskedLM(tiny_hf_config(tie_word_embeddings=False)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="MLM decoder of its own"):
        minibert.BertForPreTraining.from_pretrained(str(tmp_path))
    minibert.BertForSequenceClassification.from_pretrained(str(tmp_path))  # the encoder is all a classifier needs


def test_float16_checkpoint_saved_as_float32_says_so(tmp_path):
    """The output's config must not tell transformers to load fp32 weights as float16."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_hf_config()).half().save_pretrained(tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text()).get("dtype") == "float16"
    minibert.BertModel.from_pretrained(str(tmp_path / "fp16")).save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert transformers.BertModel.from_pretrained(tmp_path / "out").dtype == torch.float32


def test_fewer_layers_than_the_checkpoint_only_when_asked(tmp_path, caplog):
    """Keeping the bottom layers of a deeper BERT is a deliberate choice (num_hidden_layers=...), said in the
    log; weights the config does not account for otherwise are an error, not a silent drop."""
    hf = hf_classifier(tmp_path, num_labels=2)
    with caplog.at_level(logging.WARNING, logger="minibert"):
        model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path), num_hidden_layers=1).eval()
    assert len(model.bert.layers) == 1
    assert "weights not used by BertForSequenceClassification: bert.encoder.layer.*.attention" in caplog.text
    torch.testing.assert_close(model.bert.layers[0].attention.query.weight,
                               hf.bert.encoder.layer[0].attention.self.query.weight)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="encoder weights the model built from its config.json has no place for"):
        minibert.BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer, got 0"):
        BertConfig(hidden_size=32, num_attention_heads=0)
    with pytest.raises(ValueError, match="choose one of eager, sdpa, triton"):
        BertConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="hidden_act 'gelu2'"):
        BertConfig(hidden_act="gelu2")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        BertConfig.preset("huge")


def test_sequence_longer_than_positions():
    model = minibert.BertModel(BertConfig.preset("tiny", max_position_embeddings=16, vocab_size=50))
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's 16 positions"):
        model(torch.ones(1, 17, dtype=torch.long))
