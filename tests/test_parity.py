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
@pytest.mark.parametrize("mask_given", [True, False])
def test_bert_model_on_a_batch_without_padding_at_every_position(tmp_path, attn_impl, mask_given):
    """No padding (a mask of ones, or none), as at batch 1, and sequences of all max_position_embeddings
    positions, the longest the model takes; a model without a pooler gives no pooled output."""
    hf, mb = build_pair(tmp_path, transformers.BertModel, minibert.BertModel, attn_impl, max_position_embeddings=16)
    ids = torch.randint(1, 99, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids) if mask_given else None
    ref, out = hf(input_ids=ids, attention_mask=mask), mb(ids, attention_mask=mask)
    assert max_diff(ref.last_hidden_state, out.last_hidden_state) < ATOL
    assert max_diff(ref.pooler_output, out.pooler_output) < ATOL
    no_pooler = minibert.BertModel(mb.config, add_pooler=False)
    no_pooler.load_state_dict({k: v for k, v in mb.state_dict().items() if not k.startswith("pooler.")})
    plain = no_pooler.eval()(ids, attention_mask=mask)
    assert plain.pooler_output is None and max_diff(plain.last_hidden_state, out.last_hidden_state) == 0.0
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's 16 positions"):
        mb(torch.ones(1, 17, dtype=torch.long))


@pytest.mark.parametrize("attn_impl", BACKENDS)
@pytest.mark.parametrize("unpad", [True, False])
def test_bert_model(tmp_path, attn_impl, unpad):
    hf, mb = build_pair(tmp_path, transformers.BertModel, minibert.BertModel, attn_impl, unpad)
    ids, mask, types = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = mb(ids, attention_mask=mask, token_type_ids=types)
    hidden, layout = mb.encode(ids, mask, types)  # unpad packs the real tokens: (N, C), not (B, T, C)
    assert layout.packed == unpad and hidden.shape[0] == (int(mask.sum()) if unpad else len(ids))
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
    # Each part as computed from transformers' logits by hand.
    mlm_part = torch.nn.functional.cross_entropy(ref.prediction_logits[labels != -100], labels[labels != -100])
    nsp_part = torch.nn.functional.cross_entropy(ref.seq_relationship_logits, nsp)
    assert abs(out.mlm_loss.item() - mlm_part.item()) < ATOL and abs(out.nsp_loss.item() - nsp_part.item()) < ATOL
    ref.loss.backward()
    out.loss.backward()
    d_grad = compare_grads(hf, mb, "BertForPreTraining")
    report(f"BertForPreTraining[{attn_impl},unpad={unpad}]", mlm=d_mlm, nsp=d_nsp, masked=d_masked, loss=d_loss, grad=d_grad)


def test_pretraining_losses_without_labels_and_with_nothing_masked(tmp_path):
    _, mb = build_pair(tmp_path, transformers.BertForPreTraining, minibert.BertForPreTraining, "eager")
    ids, mask, types = padded_batch()
    out = mb(ids, attention_mask=mask, token_type_ids=types)
    assert out.loss is None and out.mlm_loss is None and out.nsp_loss is None
    nsp = torch.tensor([0, 1, 1, 0])
    # No position masked (a short batch can draw none): an MLM loss of exactly 0 that still has a gradient
    # (DDP needs every weight to get one), and the total is the NSP loss alone.
    out = mb(ids, attention_mask=mask, token_type_ids=types, labels=torch.full_like(ids, -100), next_sentence_label=nsp)
    assert out.mlm_loss.item() == 0.0 and out.mlm_loss.requires_grad
    assert out.loss.item() == out.nsp_loss.item() > 0
    out.loss.backward()
    assert mb.mlm_head.dense.weight.grad is not None


def test_fresh_weights_are_drawn_as_transformers_draws_them():
    """From scratch: normal(0, initializer_range) weights, zero biases, LayerNorms at (1, 0), and the [PAD]
    row of the word embeddings zero and kept out of training (padding_idx), as transformers' BERT."""
    config = minibert.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128, pad_token_id=3, num_labels=2)
    torch.manual_seed(0)
    model = minibert.BertForSequenceClassification(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            rows = p[torch.arange(len(p)) != 3] if name.endswith("word.weight") else p
            n = rows.numel()  # 5 standard errors of the sample mean and std
            assert abs(rows.mean().item()) < 5 * 0.02 / n**0.5 and abs(rows.std().item() - 0.02) < 5 * 0.02 / (2 * n)**0.5, name
    word = model.bert.embeddings.word
    assert torch.equal(word.weight[3], torch.zeros(64)) and word.weight[4].abs().sum() > 0
    ids = torch.tensor([[5, 3, 3, 7]])
    model(ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert torch.equal(word.weight.grad[3], torch.zeros(64)) and word.weight.grad[5].abs().sum() > 0


@pytest.mark.parametrize("attn_impl", BACKENDS)
@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression",
                                     "regression of 3 values"])
def test_sequence_classification(tmp_path, attn_impl, problem):
    """The loss as transformers picks it: guessed from num_labels and the labels' dtype, or, for several
    regression outputs, set by problem_type in the config (3 outputs with float labels guess multi-label)."""
    num_labels = 1 if problem == "regression" else 3
    problem_type = {"regression of 3 values": "regression"}.get(problem)
    hf, mb = build_pair(
        tmp_path, transformers.BertForSequenceClassification, minibert.BertForSequenceClassification, attn_impl,
        num_labels=num_labels, problem_type=problem_type,
    )
    assert mb.config.problem_type == problem_type
    ids, mask, types = padded_batch()
    g = torch.Generator().manual_seed(2)
    if problem == "single_label_classification":
        labels = torch.tensor([0, 2, 1, 2])
    elif problem == "multi_label_classification":
        labels = (torch.rand(4, 3, generator=g) > 0.5).float()
    elif problem == "regression":
        labels = torch.randn(4, generator=g)
    else:
        labels = torch.randn(4, 3, generator=g)
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
