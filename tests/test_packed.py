"""MKL-packed linear layers give the float32 linear's numbers, a row's output does not depend on
the other rows of its batch, and only big float32 models are packed."""

import pytest
import torch

from tokensteer.backends.packed import (
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
    return lin, PackedLinear(lin) if request.param == "head" else PackedLinear(lin, BODY_HEIGHTS)


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


def test_no_packing_when_the_copies_would_crowd_memory(monkeypatch):
    import tokensteer.backends.packed as packed

    assert packed.free_memory() > 0
    monkeypatch.setattr(packed, "free_memory", lambda: 100 << 20)  # 100 MB: the 72 MB of copies would take more than half
    assert pack_decoder_layers(_decoder(1500)) == 0
    monkeypatch.setattr(packed, "free_memory", lambda: 200 << 20)
    assert pack_decoder_layers(_decoder(1500)) == 4
