"""The llama.cpp backend (GGUF files through llama-cpp-python)."""

from tokensteer.backends.llamacpp.backend import LlamaCppBackend

__all__ = ["LlamaCppBackend"]
