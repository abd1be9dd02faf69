"""minibert's numbers against Hugging Face transformers on the same weights: outputs, losses, gradients.

Each test builds a tiny random transformers model, saves it in HF's format, loads it with minibert's
from_pretrained and runs both on a padded batch with token types. fp32, tolerance 1e-5 absolute.
Set MINIBERT_REPORT=path to append the largest differences measured (for the closing notes).
"""

import json
import os

import pytest
import torch
import transformers

import minibert
from conftest import padded_batch, tiny_hf_config
from minibert.checkpoint import hf_to_minibert_key

ATOL = 1e-5
BACKENDS = ["eager", "sdpa"]


def report(name, **diffs):
    path = os.environ.get("MINIBERT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **{k: float(v) for k, v in diffs.items()}}) + "\n")


def max_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def build_pair(tmp_path, hf_cls, mb_cls, attn_impl, unpad=True, seed=0, **config_kwargs):
    torch.manual_seed(seed)
    hf_model = hf_cls(tiny_hf_config(**config_kwargs)).eval()
    hf_model.save_pretrained(tmp_path)
    hf_model = hf_cls.from_pretrained(tmp_path, attn_implementation=attn_impl).eval()
    mb_model = mb_cls.from_pretrained(str(tmp_path), attn_impl=attn_impl, unpad=unpad).eval()
    return hf_model, mb_model


def compare_grads(hf_model, mb_model, name):
    prefix = "" if isinstance(mb_model, minibert.BertModel) else "bert."
    mb_params = dict(mb_model.named_parameters())
    worst, compared = 0.0, 0
    for hf_key, p in hf_model.named_parameters():
        key = hf_to_minibert_key(hf_key, prefix)
        if key is None:  # tied decoder: its gradient lands in the word embeddings on both sides
            continue
        assert key in mb_params, f"{hf_key} -> {key} has no minibert parameter"
        assert mb_params[key].grad is not None, f"{key} got no gradient"
        # Gradients summed over many tokens reach 1e2 (embeddings): compare relative to their scale.
        scale = max(1.0, p.grad.abs().max().item())
        worst = max(worst, max_diff(p.grad, mb_params[key].grad) / scale)
        compared += 1
    assert compared >= 20
    assert worst < ATOL, f"{name}: gradient differs by {worst:.2e} (relative to max(1, |grad|))"
    return worst


@pytest.mark.parametrize("attn_impl", BACKENDS)
@pytest.mark.parametrize("unpad", [True, False])
def test_bert_model(tmp_path, attn_impl, unpad):
    hf, mb = build_pair(tmp_path, transformers.BertModel, minibert.BertModel, attn_impl, unpad)
    ids, mask, types = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = mb(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()  # HF computes (meaningless) states at padded positions; minibert zeros them when unpadded
    d_hidden = max_diff(ref.last_hidden_state[real], out.last_hidden_state[real])
    d_pooled = max_diff(ref.pooler_output, out.pooler_output)
    assert d_hidden < ATOL and d_pooled < ATOL
    weights = torch.randn_like(out.last_hidden_state)
    ((ref.last_hidden_state * weights)[real].sum() + ref.pooler_output.sum()).backward()
    ((out.last_hidden_state * weights)[real].sum() + out.pooler_output.sum()).backward()
    d_grad = compare_grads(hf, mb, "BertModel")
    report(f"BertModel[{attn_impl},unpad={unpad}]", hidden=d_hidden, pooled=d_pooled, grad=d_grad)


@pytest.mark.parametrize("attn_impl", BACKENDS)
@pytest.mark.parametrize("unpad", [True, False])
def test_pretraining(tmp_path, attn_impl, unpad):
    hf, mb = build_pair(tmp_path, transformers.BertForPreTraining, minibert.BertForPreTraining, attn_impl, unpad)
    ids, mask, types = padded_batch()
    # Without labels: full MLM logits at every real position.
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = mb(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    d_mlm = max_diff(ref.prediction_logits[real], out.mlm_logits[real])
    d_nsp = max_diff(ref.seq_relationship_logits, out.nsp_logits)
    assert d_mlm < ATOL and d_nsp < ATOL
    # With labels: the loss, and the logits of the masked positions only.
    g = torch.Generator().manual_seed(1)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    labels[~real] = -100
    labels[0, 1] = ids[0, 1]  # at least one masked position
    nsp = torch.tensor([0, 1, 1, 0])
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    # Labels at padded positions take no loss in either layout, whatever they hold.
    labels_at_padding = torch.where(real, labels, 7)
    out = mb(ids, attention_mask=mask, token_type_ids=types, labels=labels_at_padding, next_sentence_label=nsp)
    assert out.mlm_logits.shape == (int((labels != -100).sum()), 99)
    d_masked = max_diff(ref.prediction_logits[labels != -100], out.mlm_logits)
    d_loss = abs(ref.loss.item() - out.loss.item())
    assert d_masked < ATOL and d_loss < ATOL
    ref.loss.backward()
    out.loss.backward()
    d_grad = compare_grads(hf, mb, "BertForPreTraining")
    report(f"BertForPreTraining[{attn_impl},unpad={unpad}]", mlm=d_mlm, nsp=d_nsp, masked=d_masked, loss=d_loss, grad=d_grad)


@pytest.mark.parametrize("attn_impl", BACKENDS)
@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_sequence_classification(tmp_path, attn_impl, problem):
    num_labels = 1 if problem == "regression" else 3
    hf, mb = build_pair(
        tmp_path, transformers.BertForSequenceClassification, minibert.BertForSequenceClassification, attn_impl,
        num_labels=num_labels,
    )
    ids, mask, types = padded_batch()
    g = torch.Generator().manual_seed(2)
    if problem == "single_label_classification":
        labels = torch.tensor([0, 2, 1, 2])
    elif problem == "multi_label_classification":
        labels = (torch.rand(4, 3, generator=g) > 0.5).float()
    else:
        labels = torch.randn(4, generator=g)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    out = mb(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    d_logits = max_diff(ref.logits, out.logits)
    d_loss = abs(ref.loss.item() - out.loss.item())
    assert d_logits < ATOL and d_loss < ATOL
    ref.loss.backward()
    out.loss.backward()
    d_grad = compare_grads(hf, mb, "BertForSequenceClassification")
    report(f"BertForSequenceClassification[{attn_impl},{problem}]", logits=d_logits, loss=d_loss, grad=d_grad)


@pytest.mark.parametrize("attn_impl", BACKENDS)
@pytest.mark.parametrize("unpad", [True, False])
def test_token_classification(tmp_path, attn_impl, unpad):
    hf, mb = build_pair(
        tmp_path, transformers.BertForTokenClassification, minibert.BertForTokenClassification, attn_impl, unpad,
        num_labels=5,
    )
    ids, mask, types = padded_batch()
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, ids.shape, generator=g)
    labels[:, 0] = -100
    real = mask.bool()
    # transformers is given -100 at padding; minibert real tags there, which it must ignore in both layouts.
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels.masked_fill(~real, -100))
    out = mb(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    d_logits = max_diff(ref.logits[real], out.logits[real])
    d_loss = abs(ref.loss.item() - out.loss.item())
    assert d_logits < ATOL and d_loss < ATOL
    ref.loss.backward()
    out.loss.backward()
    d_grad = compare_grads(hf, mb, "BertForTokenClassification")
    report(f"BertForTokenClassification[{attn_impl},unpad={unpad}]", logits=d_logits, loss=d_loss, grad=d_grad)


def test_unpadded_equals_padded_and_backends_agree():
    """The unpadded path and the padded path, and every CPU backend, give the same numbers."""
    torch.manual_seed(0)
    cfg = minibert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, attn_impl="eager", unpad=False)
    reference = minibert.BertModel(cfg).eval()
    ids, mask, types = padded_batch()
    expected = reference(ids, mask, types).last_hidden_state
    for attn_impl in BACKENDS:
        for unpad in (True, False):
            model = minibert.BertModel(cfg.replace(attn_impl=attn_impl, unpad=unpad)).eval()
            model.load_state_dict(reference.state_dict())
            got = model(ids, mask, types).last_hidden_state
            assert max_diff(expected[mask.bool()], got[mask.bool()]) < 1e-6
