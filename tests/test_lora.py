"""LoRA (minibert/lora.py) against peft on transformers' BERT: the same initial A, the same logits both ways
between the two formats, merged equal to unmerged, and only the LoRA weights and the head trained.

Every model is a tiny random BERT (conftest.tiny_hf_config); tolerances are 1e-5 absolute in fp32.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import minibert

from conftest import NEGATIVE, POSITIVE, padded_batch, tiny_hf_config, write_csv
from minibert import BertForSequenceClassification, BertForTokenClassification
from minibert.finetuning import count_weights
from minibert.lora import LoraModel, LoraSettings
from minibert.training import Trainer, TrainingSettings

peft = pytest.importorskip("peft")

ATOL = 1e-5
ROUNDED = 1.5e-6  # results rounded to 6 decimals: numbers 1e-7 apart can round one step apart
HF_CLASSES = {BertForSequenceClassification: transformers.BertForSequenceClassification,
              BertForTokenClassification: transformers.BertForTokenClassification}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random pretrained encoder (BertModel, no head), as a base model is."""
    directory = tmp_path_factory.mktemp("lora-base")
    torch.manual_seed(0)
    transformers.BertModel(tiny_hf_config()).save_pretrained(directory)
    return directory


def hf_classifier(base_dir, mb_cls, num_labels=3):
    return HF_CLASSES[mb_cls].from_pretrained(base_dir, num_labels=num_labels, attn_implementation="eager").eval()


def logits(model, lengths=(11, 7, 1, 9), seed=1):
    input_ids, attention_mask, token_type_ids = padded_batch(lengths=lengths, seed=seed)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    return out * attention_mask[..., None] if out.ndim == 3 else out  # padded positions of token logits are arbitrary


def train(model, steps=4, lr=1e-2, task="sequence"):
    """A few AdamW steps through minibert's Trainer on random batches (with padding), dropout on."""
    trainer = Trainer(model, TrainingSettings(lr=lr, warmup_ratio=0.0), total_steps=steps, output_dir="unused")
    for step in range(steps):
        input_ids, attention_mask, token_type_ids = padded_batch(lengths=(9, 5, 12), seed=10 + step)
        labels = torch.tensor([0, 2, 1]) if task == "sequence" else torch.randint(0, 3, input_ids.shape)
        trainer.step([dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)])
    return model.eval()


def lora_model(base_dir, mb_cls=BertForSequenceClassification, seed=1, **settings):
    model = mb_cls.from_pretrained(str(base_dir), num_labels=3, attn_impl="eager", hidden_dropout_prob=0.1,
                                   attention_probs_dropout_prob=0.1, verbose=False)
    torch.manual_seed(seed)
    return LoraModel(model, LoraSettings(**{"rank": 4, "alpha": 8, **settings}), base=str(base_dir))


# ----------------------------------------------------------------------------- the layer and its start


@pytest.mark.parametrize("targets", [("query", "value"), ("key", "attention-output", "up", "down")])
def test_lora_starts_as_the_base_model_with_peft_initial_weights(base_dir, targets):
    model = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=3, attn_impl="eager", verbose=False).eval()
    before = logits(model)
    torch.manual_seed(7)
    lora = LoraModel(model, LoraSettings(rank=4, alpha=8, targets=targets)).eval()
    assert torch.equal(logits(lora), before)  # B = 0: exactly the base model's logits
    # The same seed draws peft's A matrices, layer by layer, on transformers' model of the same weights.
    hf = hf_classifier(base_dir, BertForSequenceClassification)
    hf_weights = sum(p.numel() for p in hf.parameters())
    names = {"query": "query", "key": "key", "value": "value", "attention-output": "attention.output.dense",
             "up": "intermediate.dense", "down": "encoder.layer.0.output.dense"}
    hf_targets = [names[t] for t in targets]
    if "down" in targets:  # a bare "output.dense" would match attention.output.dense too
        hf_targets[-1:] = [f"encoder.layer.{i}.output.dense" for i in range(2)]
    torch.manual_seed(7)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf_targets, task_type="SEQ_CLS"))
    their_A = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "lora_A" in k}
    ours = lora.adapter_state_dict()
    assert len(their_A) == 2 * len(targets) and their_A.keys() <= ours.keys()
    for key, tensor in their_A.items():
        assert torch.equal(ours[key], tensor), key
    assert all(not t.any() for k, t in ours.items() if "lora_B" in k)
    trainable, total = count_weights(lora)  # what the log and train_results.json report
    assert trainable == theirs.get_nb_trainable_parameters()[0]  # peft's total counts its copy of the head too
    assert total == hf_weights + sum(t.numel() for k, t in ours.items() if ".lora_" in k)


def test_training_changes_only_lora_weights_and_the_head(base_dir):
    lora = lora_model(base_dir, targets=("query", "value", "down"))
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    train(lora)
    changed = {k for k, v in lora.state_dict().items() if not torch.equal(v, before[k])}
    lora_keys = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert len(lora_keys) == 2 * 3 * 2  # A and B of 3 modules in 2 layers
    assert changed == lora_keys | {"model.classifier.weight", "model.classifier.bias"}
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == changed


def test_merged_equals_unmerged(base_dir):
    lora = train(lora_model(base_dir, targets=("query", "key", "value", "attention-output", "up", "down")))
    unmerged = logits(lora)
    merged = lora.merged_model().eval()
    assert not any(".lora_" in k for k in merged.state_dict())  # a plain minibert model
    assert (logits(merged) - unmerged).abs().max() <= ATOL
    assert torch.equal(logits(lora), unmerged)  # merged_model leaves the LoRA model as it was
    lora.merge()  # in place, and back
    assert (logits(lora) - unmerged).abs().max() <= ATOL
    lora.unmerge()
    assert (logits(lora) - unmerged).abs().max() <= ATOL


# ----------------------------------------------------------------------------- both ways out, and in again


@pytest.mark.parametrize("mb_cls, targets, train_pooler", [
    (BertForSequenceClassification, ("query", "value"), False),
    (BertForSequenceClassification, ("value", "attention-output", "down"), True),
    (BertForTokenClassification, ("key", "intermediate", "output"), False),
])
def test_minibert_adapter_gives_the_same_logits_in_peft_and_merged_in_transformers(base_dir, tmp_path, mb_cls, targets, train_pooler):
    task = "sequence" if mb_cls is BertForSequenceClassification else "token"
    lora = train(lora_model(base_dir, mb_cls, targets=targets, train_pooler=train_pooler), task=task)
    ours = logits(lora)
    lora.save_pretrained(tmp_path / "out")
    # The adapter, by peft, on transformers' model of the base.
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if task == "sequence" else "TOKEN_CLS")
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    keys = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    assert ("base_model.model.bert.pooler.dense.weight" in keys) == train_pooler
    theirs = peft.PeftModel.from_pretrained(hf_classifier(base_dir, mb_cls), tmp_path / "out" / "adapter").eval()
    assert sum(n.endswith(".lora_A") for n, _ in theirs.named_modules()) == 2 * len(targets)  # no module more, none fewer
    assert (logits(theirs) - ours).abs().max() <= ATOL
    # The merged model, a plain BERT directory, in transformers and in minibert.
    hf_merged = HF_CLASSES[mb_cls].from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert (logits(hf_merged) - ours).abs().max() <= ATOL
    assert (logits(mb_cls.from_pretrained(str(tmp_path / "out"), verbose=False).eval()) - ours).abs().max() <= ATOL
    # And back into minibert for further training: the same weights exactly.
    again = LoraModel.from_pretrained(tmp_path / "out", verbose=False)
    assert again.settings == lora.settings
    state = lora.state_dict()
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())


def test_a_pooler_the_base_lacks_trains_and_travels_in_the_adapter(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(tiny_hf_config(), add_pooling_layer=False).save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=3, verbose=False)
    lora = LoraModel(model, LoraSettings(rank=4))
    assert lora.settings.train_pooler and model.bert.pooler.dense.weight.requires_grad
    lora = train(lora)
    lora.save_adapter(tmp_path / "adapter")
    # transformers draws its own pooler for this base: only the adapter's makes the logits the same.
    theirs = peft.PeftModel.from_pretrained(hf_classifier(tmp_path / "base", BertForSequenceClassification), tmp_path / "adapter")
    assert (logits(theirs.eval()) - logits(lora)).abs().max() <= ATOL
    no_pooler = save_peft(tmp_path / "base", tmp_path / "peft", peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(ValueError, match="the base model has no pooler and the adapter .* brings none"):
        LoraModel.from_adapter(BertForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=3,
                                                                             verbose=False), no_pooler)


@pytest.mark.parametrize("mb_cls", [BertForSequenceClassification, BertForTokenClassification])
def test_peft_adapter_gives_the_same_logits_in_minibert(base_dir, tmp_path, mb_cls):
    torch.manual_seed(3)
    hf = hf_classifier(base_dir, mb_cls)
    task_type = "SEQ_CLS" if mb_cls is BertForSequenceClassification else "TOKEN_CLS"
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, lora_dropout=0.1, task_type=task_type,
                                                     target_modules=["query", "value", "intermediate.dense"]))
    with torch.no_grad():  # as if trained: B and the head away from their initial values
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    expected = logits(theirs.eval())
    model = mb_cls.from_pretrained(str(base_dir), num_labels=3, verbose=False)
    lora = LoraModel.from_adapter(model, tmp_path / "adapter", base=str(base_dir)).eval()
    assert lora.settings == LoraSettings(rank=2, alpha=5, dropout=0.1, targets=("query", "value", "intermediate"))
    assert (logits(lora) - expected).abs().max() <= ATOL
    assert (logits(lora.merged_model().eval()) - expected).abs().max() <= ATOL


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("settings, message", [
    (dict(targets=("query", "dense")), r"--lora-targets: unknown name\(s\) 'dense'; choose from query, key"),
    (dict(rank=0), "--lora-rank must be a positive integer, got 0"),
    (dict(alpha=-1), "--lora-alpha must be positive"),
    (dict(dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
    (dict(targets=("output", "down")), "names a layer twice"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(**settings)


def save_peft(base_dir, directory, config, mb_cls=BertForSequenceClassification, **hf_config):
    hf = HF_CLASSES[mb_cls](tiny_hf_config(num_labels=3, **hf_config)) if hf_config else hf_classifier(base_dir, mb_cls)
    peft.get_peft_model(hf, config).save_pretrained(directory)
    return directory


def test_adapters_minibert_cannot_compute_are_refused(base_dir, tmp_path):
    model = lambda: BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=3, verbose=False)  # noqa: E731
    cases = [
        (peft.IA3Config(task_type="SEQ_CLS", target_modules=["query", "value"], feedforward_modules=[]),
         "is a IA3 adapter; minibert loads LoRA adapters only"),
        (peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], use_dora=True), "has use_dora = True, a LoRA variant"),
        (peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], bias="all"), "has bias = 'all'"),
        (peft.LoraConfig(task_type="SEQ_CLS", target_modules=["word_embeddings"]), "changes base_model.model.bert.embeddings"),
        (peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], layers_to_transform=[1]),
         r"lacks bert.encoder.layer.0.attention.self.query.lora_A: minibert adapts a module in every layer"),
        (peft.LoraConfig(task_type="TOKEN_CLS", target_modules=["query"]), "is for a BertForTokenClassification"),
    ]
    for i, (config, message) in enumerate(cases):
        mb_cls = BertForTokenClassification if config.task_type == "TOKEN_CLS" else BertForSequenceClassification
        directory = save_peft(base_dir, tmp_path / str(i), config, mb_cls)
        with pytest.raises(ValueError, match=message):
            LoraModel.from_adapter(model(), directory)
    # Adapters of another base: more layers, other sizes, another number of labels.
    deeper = save_peft(base_dir, tmp_path / "deeper", peft.LoraConfig(task_type="SEQ_CLS", target_modules=["value"]),
                       num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"LoRA weights for bert.encoder.layer.2.attention.self.value, which --init \(with 2 layers\)"):
        LoraModel.from_adapter(model(), deeper)
    wider = save_peft(base_dir, tmp_path / "wider", peft.LoraConfig(task_type="SEQ_CLS", target_modules=["value"]),
                      hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"has shape \(8, 48\) but --init's needs \(8, 32\): the adapter belongs to a base"):
        LoraModel.from_adapter(model(), wider)
    three_labels = save_peft(base_dir, tmp_path / "labels", peft.LoraConfig(task_type="SEQ_CLS", target_modules=["value"]))
    two_labels = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=2, verbose=False)
    with pytest.raises(ValueError, match="classifier has 3 outputs but the task has 2: pass --reinit-head"):
        LoraModel.from_adapter(two_labels, three_labels)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: pass the folder peft's save_pretrained wrote"):
        LoraModel.from_adapter(model(), base_dir)


# ----------------------------------------------------------------------------- train_finetune.py --lora-*

def sentiment_rows(n):
    """n rows that alternate positive and negative, through every text of each class before one comes again."""
    return [(POSITIVE[i // 2 % len(POSITIVE)], "pos") if i % 2 == 0 else (NEGATIVE[i // 2 % len(NEGATIVE)], "neg")
            for i in range(n)]


def sentiment_csv(path, n=24):
    return write_csv(path, sentiment_rows(n))


def finetune(tiny_init_dir, out, *args, **kwargs):
    import train_finetune

    argv = ["--init", str(tiny_init_dir), "--output-dir", str(out), "--batch-size", "4", "--no-progress", "--seed", "0",
            *map(str, args)]
    return train_finetune.main(argv, **kwargs)


@pytest.fixture(scope="module")
def lively_init_dir(tmp_path_factory, tiny_init_dir):
    """tiny_init_dir's BERT drawn with 10 times the weights (initializer_range 0.2): its outputs move from text to
    text, so that a few LoRA steps give predictions far apart, which a wrong weight or temperature would change."""
    import shutil

    directory = tmp_path_factory.mktemp("lively-bert")
    torch.manual_seed(0)
    transformers.BertModel(tiny_hf_config(vocab_size=30522, initializer_range=0.2)).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_init_dir / name, directory / name)
    return directory


def test_a_lora_run_that_learned_gives_its_predictions_merged_in_transformers_as_an_adapter_in_peft_and_in_minibert_pipeline(
        lively_init_dir, tmp_path):
    """A LoRA run that learned its task: predictions.jsonl (which the run computed with the unmerged LoRA model),
    minibert.pipeline on its directory, the merged model in transformers and the adapter in peft on --init agree."""
    train, test = sentiment_csv(tmp_path / "train.csv"), sentiment_csv(tmp_path / "test.csv", n=12)
    # One validation label flipped (row 3, a negative text, says pos): no model gets them all right, so a
    # temperature is fitted (T stays 1 otherwise).
    dev = write_csv(tmp_path / "dev.csv", [(text, "pos" if i == 3 else label) for i, (text, label) in enumerate(sentiment_rows(12))])
    results = finetune(lively_init_dir, tmp_path / "out", "--train-file", train, "--validation-file", dev, "--test-file", test,
                       "--max-steps", 48, "--eval-steps", 6, "--lr", "2e-2", "--lora-rank", 4, "--lora-targets", "query,value,down")
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in records]
    # It learned: most test labels right (chance is a half), a temperature the predictions had to apply, finite.
    temperature = json.loads((out / "config.json").read_text())["calibration_temperature"]
    right = sum(r["label"] == r["gold"] for r in records)
    assert len(records) == 12 and right >= 10 and results["test"]["accuracy"] == right / 12
    assert 0.05 < temperature < 20 and abs(temperature - 1) > 0.05  # fitted (not 1), not run away
    # The merged model in transformers gives the run's calibrated probabilities and labels.
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = transformers.AutoTokenizer.from_pretrained(out)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    labels = [merged.config.id2label[i] for i in range(2)]
    probs = torch.tensor([[r["probabilities"][label] for label in labels] for r in records])
    assert (merged_logits.div(temperature).softmax(-1) - probs).abs().max() <= 1e-5
    assert [labels[i] for i in merged_logits.argmax(-1)] == [r["label"] for r in records]
    assert probs.max(-1).values.median() > 0.75 and probs[:, 0].max() - probs[:, 0].min() > 0.5  # far from a half, far apart
    # The adapter, by peft on transformers' model of --init, gives the same logits.
    base = transformers.AutoModelForSequenceClassification.from_pretrained(lively_init_dir, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        assert (theirs(**inputs).logits - merged_logits).abs().max() <= ATOL
    # minibert.pipeline on the run's directory gives its predictions.
    ours = minibert.pipeline(out, precision="fp32")(texts)  # auto would be bf16 on a CPU that has it
    assert [{k: v for k, v in r.items() if k not in ("text", "gold")} for r in records] == [
        {**result, "score": pytest.approx(result["score"], abs=ROUNDED),
         "probabilities": pytest.approx(result["probabilities"], abs=ROUNDED)} for result in ours]
    # Only the adapted layers and the head differ from --init; the counts are the LoRA model's.
    init = load_file(lively_init_dir / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    changed = {k for k in init if not torch.equal(init[k], trained["bert." + k])}
    assert changed == {f"encoder.layer.{i}.{m}.weight" for i in range(2)
                       for m in ("attention.self.query", "attention.self.value", "output.dense")}
    lora = (2 * 4 * (32 + 32)) * 2 + 4 * (37 + 32) * 2  # A and B of query and value, and of output.dense, in 2 layers
    assert results["train"]["trainable_parameters"] == lora + 2 * 32 + 2
    assert results["train"]["total_parameters"] == sum(t.numel() for t in init.values() if t.is_floating_point()) + lora + 2 * 32 + 2
    assert results["train"]["adapter_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    assert json.loads((out / "train_results.json").read_text()) == results["train"]


def tagged_words(text):
    """A tagging task of its own for each sentence: the first two words one entity (B-X I-X), the rest O."""
    words = text.split()
    return {"tokens": words, "tags": ["B-X", "I-X"] + ["O"] * (len(words) - 2)}


def test_a_lora_tagger_s_directory_predicts_in_minibert_pipeline_as_merged_in_transformers_and_in_its_predictions(
        lively_init_dir, tmp_path):
    """The output directory of a LoRA tagger's run, read by minibert.pipeline, gives predictions.jsonl's entities
    (which the run computed with the unmerged LoRA model) and, word by word, the merged model's logits in transformers."""
    texts = POSITIVE + NEGATIVE
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(tagged_words(t)) + "\n" for t in texts * 2))
    results = finetune(lively_init_dir, tmp_path / "out", "--train-file", data, "--validation-file", data, "--test-file", data,
                       "--task-type", "token-classification", "--max-steps", 40, "--eval-steps", 40, "--lr", "3e-2",
                       "--lora-rank", 4, "--no-group-by-length")
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()][:len(texts)]
    # It learned the task (chance tags give an entity F1 near 0): most sentences' one entity is their first two
    # words (start and end count words, as the input is words).
    found = sum([(e["text"], e["start"], e["end"]) for e in r["entities"]] == [(" ".join(r["tokens"][:2]), 0, 2)]
                for r in records)
    assert results["test"]["f1"] >= 0.8 and found >= 10
    pipe = minibert.pipeline(out, precision="fp32")  # auto would be bf16 on a CPU that has it
    words = [t.split() for t in texts]
    ours = pipe(words, is_split_into_words=True)
    assert [{k: v for k, v in r.items() if k not in ("tokens", "gold")} for r in records] == [
        {**result, "entities": [{**e, "score": pytest.approx(e["score"], abs=ROUNDED)} for e in result["entities"]]}
        for result in ours]
    assert any(result["entities"] for result in ours) and any(result["tags"] != ours[0]["tags"] for result in ours)
    merged = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    inputs = transformers.AutoTokenizer.from_pretrained(out)(words, is_split_into_words=True, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = merged(**inputs).logits
    for row, sentence in enumerate(words):  # each word's logits are those of its first piece
        ids = inputs.word_ids(row)
        theirs = logits[row, [ids.index(w) for w in range(len(sentence))]]
        assert (torch.from_numpy(pipe.outputs(pipe.examples([sentence], True))[0]) - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("task_type, rows", [
    ("regression", list(zip(POSITIVE + NEGATIVE, [3.5, 2.0, 1.5, 3.0, 2.5, 1.0, -2.5, -1.0, -3.5, -0.5, -2.0, -3.0]))),
    ("multilabel", [(t, "good|fun" if i % 2 else "bad") for i, t in enumerate(POSITIVE + NEGATIVE)]),
    ("token-classification", None),
])
def test_lora_works_with_every_task_type(tiny_init_dir, tmp_path, task_type, rows):
    if rows is None:
        train = tmp_path / "train.jsonl"
        train.write_text("".join(json.dumps({"tokens": t.split(), "tags": ["B-X" if i == 0 else "O" for i in range(len(t.split()))]})
                                 + "\n" for t in POSITIVE + NEGATIVE))
    else:
        train = write_csv(tmp_path / "train.csv", rows)
    finetune(tiny_init_dir, tmp_path / "out", "--train-file", train, "--validation-file", train, "--task-type", task_type,
             "--max-steps", 3, "--lr", "1e-2", "--lora-rank", 2, "--lora-targets", "key,intermediate")
    out = tmp_path / "out"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == ("TOKEN_CLS" if task_type == "token-classification" else "SEQ_CLS")
    lora = LoraModel.from_pretrained(out, verbose=False).eval()
    mb_cls = BertForTokenClassification if task_type == "token-classification" else BertForSequenceClassification
    merged = mb_cls.from_pretrained(str(out), verbose=False).eval()
    assert merged.config.problem_type == lora.config.problem_type
    assert (logits(lora) - logits(merged)).abs().max() <= ATOL


def test_lora_resume_is_exact(tiny_init_dir, tmp_path):
    train = sentiment_csv(tmp_path / "train.csv")
    args = ["--train-file", train, "--validation-file", train, "--max-steps", 6, "--eval-steps", 2, "--lr", "1e-2",
            "--lora-rank", 4, "--lora-dropout", 0.2, "--lora-train-pooler"]
    finetune(tiny_init_dir, tmp_path / "a", *args)
    assert finetune(tiny_init_dir, tmp_path / "b", *args, _stop_after_steps=5) == {"stopped_at": 5}
    assert (tmp_path / "b" / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()  # saved at step 4
    import train_finetune

    train_finetune.main(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress"])
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = lambda d: [r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                        if r["split"] == "train"]
    assert losses("a") == losses("b") and len(losses("a")) == 6


def peft_adapter_for(tiny_init_dir, directory, num_labels=2, seed=5):
    """An adapter peft made on transformers' model of tiny_init_dir, its weights moved off their start."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_init_dir, num_labels=num_labels)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(directory)
    return theirs.eval()


def test_a_peft_adapter_predicts_and_trains_further(tiny_init_dir, tmp_path):
    theirs = peft_adapter_for(tiny_init_dir, tmp_path / "peft")
    texts = write_csv(tmp_path / "texts.csv", [(t, i % 2) for i, t in enumerate(POSITIVE + NEGATIVE)])  # labels: class ids
    finetune(tiny_init_dir, tmp_path / "predicted", "--lora-adapter", tmp_path / "peft", "--predict-only", "--test-file", texts,
             "--precision", "fp32")
    predictions = [json.loads(line) for line in (tmp_path / "predicted" / "predictions.jsonl").read_text().splitlines()]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_init_dir)
    with torch.no_grad():
        expected = theirs(**tok([p["text"] for p in predictions], return_tensors="pt", padding=True)).logits.softmax(-1)
    got = torch.tensor([[p["probabilities"]["0"], p["probabilities"]["1"]] for p in predictions])
    assert (got - expected).abs().max() <= ATOL  # peft names no labels: they are the class ids
    assert (tmp_path / "predicted" / "test_results.json").is_file()
    # Training it further, on labels that are the class ids.
    finetune(tiny_init_dir, tmp_path / "more", "--lora-adapter", tmp_path / "peft", "--train-file", texts,
             "--validation-file", texts, "--max-steps", 2, "--lr", "1e-2")
    config = json.loads((tmp_path / "more" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (2, 4, "SEQ_CLS")
    before = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    after = load_file(tmp_path / "more" / "adapter" / "adapter_model.safetensors")
    assert after.keys() == before.keys() and all(not torch.equal(after[k], before[k]) for k in after)


def test_lora_on_the_triton_backend_matches_eager():
    pytest.importorskip("triton")
    from minibert import BertConfig
    from minibert.kernels import triton_available

    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                        attn_impl="eager")
    torch.manual_seed(0)
    models = []
    for attn_impl in ("eager", "triton"):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config.replace(attn_impl=attn_impl))
        torch.manual_seed(1)
        models.append(LoraModel(model, LoraSettings(rank=4, dropout=0.0)).to(device))
    with torch.no_grad():  # B away from zero, so that the LoRA path counts
        for lora in models:
            for layer in lora.lora_layers().values():
                layer.lora_B.weight.copy_(torch.linspace(-0.1, 0.1, layer.lora_B.weight.numel()).view_as(layer.lora_B.weight))
    ids, mask, types = (t.to(device) for t in padded_batch(lengths=(7, 3, 1, 5)))
    outs = [lora(ids, mask, types, labels=torch.tensor([0, 2, 1, 1], device=device)) for lora in models]
    assert (outs[0].logits - outs[1].logits).abs().max() < 1e-5
    for out in outs:
        out.loss.backward()
    grads = [{n: p.grad for n, p in lora.named_parameters() if p.requires_grad} for lora in models]
    assert len(grads[0]) == 2 * 2 * 2 + 2
    for name, grad in grads[0].items():
        assert (grad - grads[1][name]).abs().max() <= 1e-5 * max(1.0, grad.abs().max().item()), name


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "0"], "--lora-rank must be a positive integer, got 0"),
    (["--lora-rank", "8", "--lora-targets", "query,dense"], r"--lora-targets: unknown name\(s\) 'dense'"),
    (["--lora-rank", "8", "--freeze-layers", "1"], "--freeze-layers with LoRA: LoRA already decides what trains"),
    (["--lora-rank", "8", "--layer-lr-decay", "0.9"], "--layer-lr-decay with LoRA"),
    (["--lora-rank", "8", "--reinit-layers", "1"], "--reinit-layers with LoRA"),
    (["--lora-rank", "8", "--crf"], "--crf with LoRA: a peft adapter cannot carry the CRF's transition scores"),
    (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank R"),
    (["--lora-adapter", "{peft}", "--lora-rank", "8"], "--lora-rank with --lora-adapter: the adapter's adapter_config.json sets"),
    (["--lora-adapter", "{missing}"], "--lora-adapter .*missing: no such directory"),
    (["--lora-adapter", "{ia3}"], "is a IA3 adapter; minibert loads LoRA adapters only"),
    (["--lora-adapter", "{wider}"], r"has shape \(8, 48\) but --init's needs \(8, 32\)"),
    (["--lora-adapter", "{three}"], "classifier has 3 outputs but the task has 2: pass --reinit-head"),
])
def test_bad_lora_input_is_a_one_line_error_before_anything_is_written(tiny_init_dir, tmp_path, flags, message):
    train = sentiment_csv(tmp_path / "train.csv")
    adapters = {"peft": tmp_path / "peft", "missing": tmp_path / "missing", "ia3": tmp_path / "ia3",
                "wider": tmp_path / "wider", "three": tmp_path / "three"}
    if "{peft}" in flags:
        peft_adapter_for(tiny_init_dir, adapters["peft"])
    if "{ia3}" in flags:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_init_dir)
        peft.get_peft_model(hf, peft.IA3Config(task_type="SEQ_CLS", target_modules=["query"], feedforward_modules=[])).save_pretrained(adapters["ia3"])
    if "{wider}" in flags:
        save_peft(None, adapters["wider"], peft.LoraConfig(task_type="SEQ_CLS", target_modules=["value"]), hidden_size=48,
                  num_attention_heads=4, vocab_size=30522)
    if "{three}" in flags:
        peft_adapter_for(tiny_init_dir, adapters["three"], num_labels=3)
    flags = [f.format(**adapters) for f in flags]
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:  # what run_cli prints as one line
        finetune(tiny_init_dir, tmp_path / "out", "--train-file", train, "--validation-file", train, "--max-steps", 1, *flags)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
