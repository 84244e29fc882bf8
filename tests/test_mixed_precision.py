"""The losses with hand-written backward passes under autocast (nnU-Net trains with it on GPUs): each computes in
float32 whatever autocast is on, so its value and gradients under CPU bfloat16 autocast are those of float32
(before the fix, the forward products ran in bfloat16 while the backward recomputed in float32)."""
import pytest
import torch

from nnunet_weak.losses.attentive_similarity import attention_log_normaliser, attentive_similarity_loss
from nnunet_weak.losses.gated_crf import masked_gated_crf_loss
from nnunet_weak.losses.local_window import LocalWindow
from nnunet_weak.losses.omni_correlation import omni_correlation_loss


def value_and_gradients(loss, inputs, autocast: bool):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = loss(*leaves)
    value.sum().backward()
    return value.detach(), [t.grad for t in leaves if t.requires_grad]


def assert_autocast_changes_nothing(loss, inputs):
    reference, reference_gradients = value_and_gradients(loss, inputs, autocast=False)
    value, gradients = value_and_gradients(loss, inputs, autocast=True)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
    for gradient, expected in zip(gradients, reference_gradients):
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def attention_inputs(seed=0, grid=(12, 10), channels=16):
    generator = torch.Generator().manual_seed(seed)
    # large logits, as a trained block's: bfloat16 products of these are off by whole units
    queries = 3 * torch.randn(2, channels, *grid, generator=generator)
    keys = 3 * torch.randn(2, channels, *grid, generator=generator)
    probabilities = torch.softmax(torch.randn(2, 3, *grid, generator=generator), 1)
    return [probabilities, queries, keys, torch.tensor(1.3), torch.tensor(-0.4)]


@pytest.mark.parametrize("max_elements", [5000, 1 << 20], ids=["tiled", "whole-grid"])
def test_attentive_similarity_under_autocast(max_elements):
    window = LocalWindow.gaussian(5, 6.0, (1.0, 1.0))
    assert_autocast_changes_nothing(
        lambda *t: attentive_similarity_loss(*t, window, max_elements=max_elements), attention_inputs())


def test_attention_log_normaliser_under_autocast():
    _, queries, keys, _, _ = attention_inputs(1)
    assert_autocast_changes_nothing(lambda q, k: attention_log_normaliser(q, k), [queries, keys])


def test_gated_crf_under_autocast():
    generator = torch.Generator().manual_seed(2)
    probabilities = torch.softmax(torch.randn(2, 3, 16, 14, generator=generator), 1)
    image = torch.rand(2, 1, 16, 14, generator=generator)
    unannotated = torch.rand(2, 16, 14, generator=generator) > 0.1
    window = LocalWindow.gaussian(3, 2.0, (1.0, 1.0))
    assert_autocast_changes_nothing(lambda p, i: masked_gated_crf_loss(p, i, unannotated, window), [probabilities, image])


def test_omni_correlation_under_autocast():
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(40, 32, generator=generator), torch.randn(40, 32, generator=generator)
    memory = torch.randn(64, 32, generator=generator)
    assert_autocast_changes_nothing(lambda a, b: omni_correlation_loss(a, b, memory, rows_per_chunk=16),
                                    [first, second])
