"""The MKL-packed output layer gives the float32 linear's numbers, and a row's logits do not depend
on the other rows of its batch."""

import pytest
import torch

from tokensteer.backends.packed_head import MIN_SIZE, PackedHead, mkl_packing_available, pack_output_layer

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this PyTorch has no MKL packed GEMM")


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, MIN_SIZE // 256, bias=False)
    return lin, PackedHead(lin)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
def test_matches_linear(layer, n):
    lin, packed = layer
    x = torch.randn(n, 1, 256)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-4, atol=1e-4)


def test_row_does_not_depend_on_its_batch(layer):
    _, packed = layer
    x = torch.randn(8, 256)
    with torch.inference_mode():
        full = packed(x)
        for n in (4, 5, 7):
            assert torch.equal(packed(x[:n]), full[:n])


def test_tiny_output_layers_are_left_alone():
    model = torch.nn.Module()
    model.lm = torch.nn.Linear(8, 16)
    model.get_output_embeddings = lambda: model.lm
    assert pack_output_layer(model) is False
