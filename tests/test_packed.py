"""MKL-packed linear layers give the float32 linear's numbers, a row's output does not depend on
the other rows of its batch, and only big float32 models are packed."""

import pytest
import torch

from tokensteer.backends.torch.packed import (
    BODY_HEIGHTS,
    MIN_SIZE,
    PackedLinear,
    mkl_packing_available,
    pack_decoder_layers,
    pack_output_layer,
)

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this PyTorch has no MKL packed GEMM")


@pytest.fixture(scope="module", params=["head", "body"])
def layer(request):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, MIN_SIZE // 256 if request.param == "head" else 512, bias=request.param == "body")
    return lin, PackedLinear(lin, pad_two=True) if request.param == "head" else PackedLinear(lin, BODY_HEIGHTS)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
def test_matches_linear(layer, n):
    lin, packed = layer
    x = torch.randn(n, 1, 256)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_row_does_not_depend_on_the_other_rows(layer, n):
    """Rows may take another kernel at another batch size, but never depend on their neighbours."""
    _, packed = layer
    x = torch.randn(n, 256)
    other = torch.cat([x[:1], torch.randn(n - 1, 256)])
    with torch.inference_mode():
        assert torch.equal(packed(x)[0], packed(other)[0])


@pytest.mark.parametrize(("n", "height"), [(1, 1), (2, None), (3, 4), (4, 4), (5, 8), (8, 8), (9, None)])
def test_rows_take_the_snuggest_packing(n, height):
    lin = torch.nn.Linear(64, 64)
    assert PackedLinear(lin).height(n) == height
    assert PackedLinear(lin, BODY_HEIGHTS).height(n) == (None if n <= 2 else height)
    assert PackedLinear(lin, pad_two=True).height(n) == (4 if n == 2 else height)


def test_gradients_flow_through_the_plain_layer(layer):
    lin, packed = layer
    x = torch.randn(4, 256, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    lin.weight.grad = None


def test_tiny_output_layers_are_left_alone():
    model = torch.nn.Module()
    model.lm = torch.nn.Linear(8, 16)
    model.get_output_embeddings = lambda: model.lm
    assert pack_output_layer(model) is False


def _decoder(width: int) -> torch.nn.ModuleList:
    block = lambda: torch.nn.ModuleDict({"mlp": torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width))})
    return torch.nn.ModuleList([block(), block()])


def test_decoder_layers_are_packed_only_when_big(monkeypatch):
    small = _decoder(16)
    assert pack_decoder_layers(small) == 0 and type(small[0]["mlp"][0]) is torch.nn.Linear
    big = _decoder(1500)  # 2 layers × 2 × 4.5M elements ≥ MIN_SIZE
    x = torch.randn(5, 1500)
    with torch.inference_mode():
        want = big[1]["mlp"](big[0]["mlp"](x))
        assert pack_decoder_layers(big) == 4
        assert isinstance(big[0]["mlp"][1], PackedLinear)
        torch.testing.assert_close(big[1]["mlp"](big[0]["mlp"](x)), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("TOKENSTEER_PACK", "0")
    assert pack_decoder_layers(_decoder(1500)) == 0


def test_packings_are_dropped_when_the_copies_would_crowd_memory(monkeypatch):
    """Each height of the 2 × 4.5M-element decoder takes 72 MB; only half the free memory is used."""
    import tokensteer.backends.torch.packed as packed

    assert packed.free_memory() > 0
    monkeypatch.setattr(packed, "free_memory", lambda: 100 << 20)
    assert pack_decoder_layers(_decoder(1500)) == 0
    for free, heights in ((200 << 20, [8]), (300 << 20, [4, 8])):
        monkeypatch.setattr(packed, "free_memory", lambda: free)
        big = _decoder(1500)
        assert pack_decoder_layers(big) == 4
        assert list(big[0]["mlp"][0].packed) == heights
