"""LoRA (minibert/lora.py) against peft on transformers' BERT: the same initial A, the same logits both ways
between the two formats, merged equal to unmerged, and only the LoRA weights and the head trained.

Every model is a tiny random BERT (conftest.tiny_hf_config); tolerances are 1e-5 absolute in fp32.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import padded_batch, tiny_hf_config
from minibert import BertForSequenceClassification, BertForTokenClassification
from minibert.lora import LoraModel, LoraSettings
from minibert.training import Trainer, TrainingSettings

peft = pytest.importorskip("peft")

ATOL = 1e-5
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
    trainable, total = lora.parameter_counts()
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
