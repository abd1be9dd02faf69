"""PersistentGradEmbedding gives nn.Embedding's gradients exactly, step after step."""

import torch
import torch.nn.functional as F
from torch import nn

import minibert
from minibert.embedding_grad import PersistentGradEmbedding, keep_embedding_gradients


def _grads_over_steps(embedding: nn.Embedding, batches, tied: bool):
    """Per step: backward over each micro-batch (accumulating), copy the gradient, clear it as the Trainer does."""
    out = []
    for micro in batches:
        for ids in micro:
            x = embedding(ids)  # (B, T, C)
            loss = (x * torch.arange(x.shape[-1])).square().sum()
            if tied:  # a decoder on the same table, as the masked-LM head has
                loss = loss + F.linear(x.detach(), embedding.weight).logsumexp(-1).sum()
            loss.backward()
        out.append(embedding.weight.grad.clone())
        embedding.weight.grad = None  # optimizer.zero_grad(set_to_none=True)
    return out


def test_gradients_equal_nn_embedding_with_padding_repeats_accumulation_and_a_tied_decoder():
    g = torch.Generator().manual_seed(0)
    # step 1 touches rows the later steps do not: stale rows must be cleared
    batches = [[torch.tensor([[5, 5, 7, 0], [9, 0, 0, 0]])],
               [torch.randint(0, 12, (3, 4), generator=g), torch.tensor([[1, 1, 1, 0]])],  # 2 micro-batches
               [torch.tensor([[2, 3, 0, 0]])]]
    for tied in (False, True):
        torch.manual_seed(0)
        reference = nn.Embedding(12, 6, padding_idx=0)
        ours = PersistentGradEmbedding.replacing(nn.Embedding(12, 6, padding_idx=0))
        ours.weight.data.copy_(reference.weight.data)
        for want, got in zip(_grads_over_steps(reference, batches, tied), _grads_over_steps(ours, batches, tied)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # summation order only
        if not tied:  # the padding row gets no gradient from the lookup (a decoder gives it one)
            assert bool((got[0] == 0).all())


def test_the_buffer_is_reused_and_the_weight_shared():
    embedding = nn.Embedding(10, 4)
    ours = PersistentGradEmbedding.replacing(embedding)
    assert ours.weight is embedding.weight  # the optimizer's parameter, not a copy
    ours(torch.tensor([1, 2])).sum().backward()
    first = ours.weight.grad
    ours.weight.grad = None
    ours(torch.tensor([3])).sum().backward()
    assert ours.weight.grad is first  # no new (V, C) tensor
    assert ours.weight.grad[[1, 2]].abs().sum() == 0 and bool((ours.weight.grad[3] == 1).all())


def test_keep_embedding_gradients_on_a_pretraining_model_keeps_the_tie_and_the_numbers():
    config = minibert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    reference = minibert.BertForPreTraining(config)
    ours = minibert.BertForPreTraining(config)
    ours.load_state_dict(reference.state_dict())
    keep_embedding_gradients(ours)
    assert isinstance(ours.bert.embeddings.word, PersistentGradEmbedding)
    assert ours.mlm_head.word_embeddings is ours.bert.embeddings.word
    assert list(ours.state_dict()) == list(reference.state_dict())
    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = torch.where(torch.rand(2, 8, generator=torch.Generator().manual_seed(2)) < 0.3, ids, -100)
    for model in (reference, ours):
        model(ids, mask, labels=labels, next_sentence_label=torch.tensor([0, 1])).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
