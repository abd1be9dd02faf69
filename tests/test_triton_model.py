"""The whole model on the Triton attention backend (through the interpreter on a CPU) against eager."""

import pytest
import torch

import minibert
from conftest import padded_batch

pytest.importorskip("triton")
from minibert.kernels import triton_available  # noqa: E402

ok, why = triton_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)


@pytest.mark.parametrize("unpad", [True, False])
def test_triton_backend_matches_eager_outputs_and_gradients(unpad):
    cfg = minibert.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,  # head dim 32
                              intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, num_labels=3, attn_impl="eager")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter on a CPU
    torch.manual_seed(0)
    reference = minibert.BertForSequenceClassification(cfg).to(device)
    model = minibert.BertForSequenceClassification(cfg.replace(attn_impl="triton", unpad=unpad)).to(device)
    model.load_state_dict(reference.state_dict())
    ids, mask, types = (t.to(device) for t in padded_batch(lengths=(7, 3, 1, 5)))
    labels = torch.tensor([0, 2, 1, 1], device=device)
    ref = reference(ids, mask, types, labels=labels)
    out = model(ids, mask, types, labels=labels)
    assert (ref.logits - out.logits).abs().max() < 1e-5
    ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item()), name


def test_unsupported_head_dim_is_a_clear_error():
    cfg = minibert.BertConfig.preset("tiny", vocab_size=50, num_attention_heads=4, attn_impl="triton")  # head dim 32
    cfg = cfg.replace(hidden_size=40, num_attention_heads=5)  # head dim 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = minibert.BertModel(cfg).to(device)
    with pytest.raises(ValueError, match=r"unsupported head_dim 8; the triton attention supports \(32, 64, 128\)"):
        model(torch.ones(1, 4, dtype=torch.long, device=device))
