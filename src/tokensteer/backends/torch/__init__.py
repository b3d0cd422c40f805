"""The PyTorch/transformers backend."""

from tokensteer.backends.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
