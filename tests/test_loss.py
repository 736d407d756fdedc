"""The supervised-only chunked loss equals the model's own full-logits loss, value and gradient."""

import pytest
import torch

from lora.data.prompt import IGNORE_INDEX
from lora.inject import apply_lora, lora_layers, lora_parameters
from lora.model import load_model
from lora.spec import LoRASpec
from lora.train.loss import CausalLMLoss, count_supervised, reference_loss, supervised_loss_sum


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 16), generator=g)
    labels = input_ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt
    labels[1, :4] = IGNORE_INDEX
    labels[1, 12:] = IGNORE_INDEX  # padding
    labels[2, :15] = IGNORE_INDEX  # a single supervised token
    attention = torch.ones_like(input_ids)
    attention[1, 12:] = 0
    return input_ids, attention, labels


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_supervised_loss_equals_model_loss_and_gradients(arch_dir, chunk):
    model = load_model(str(arch_dir))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    input_ids, attention, labels = batch(model.config.vocab_size)

    reference = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    reference.backward()
    ref_grads = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()

    loss_sum, n = CausalLMLoss(model, chunk)(input_ids, attention, labels)
    assert n == count_supervised(labels) == 7 + 8 + 1
    torch.testing.assert_close(loss_sum / n, reference, atol=1e-5, rtol=0)
    (loss_sum / n).backward()
    for ours, ref in zip((p.grad for p in lora_parameters(model)), ref_grads):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)


def test_chunked_loss_equals_the_textbook_three_line_cross_entropy(arch_dir):
    model = load_model(str(arch_dir)).requires_grad_(False)  # the loss assumes a frozen lm_head
    input_ids, attention, labels = batch(model.config.vocab_size, seed=1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    textbook = reference_loss(logits, labels)
    loss_sum, n = CausalLMLoss(model, chunk_size=5)(input_ids, attention, labels)
    torch.testing.assert_close(loss_sum / n, textbook, atol=1e-5, rtol=0)
    # Forgetting the shift gives another number: the test can tell.
    unshifted = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
    )
    assert abs(unshifted.item() - textbook.item()) > 1e-3


def test_no_supervised_token_gives_zero_and_keeps_graph():
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    loss, n = supervised_loss_sum(hidden, torch.full((2, 5), IGNORE_INDEX), head)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None


def test_loss_never_builds_full_vocabulary_logits_for_the_prompt():
    """Only supervised rows reach lm_head: a head that records its input sizes proves it."""
    seen = []

    class Head(torch.nn.Linear):
        pass

    head = Head(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 100, 8)
    labels = torch.full((1, 100), IGNORE_INDEX)
    labels[0, 90:] = 1
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0])
        return orig(x, w, b)

    torch.nn.functional.linear = spy
    try:
        supervised_loss_sum(hidden, labels, head, chunk_size=4)
    finally:
        torch.nn.functional.linear = orig
    assert sum(seen) == 10 and max(seen) <= 4
