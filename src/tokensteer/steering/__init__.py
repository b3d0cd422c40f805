"""Activation steering: vectors from contrast pairs, files with provenance, automatic layer and
strength, and llama.cpp interchange.

    from tokensteer.steering import load_pairs, train_vector, save_vector, steer
    vec = train_vector(lm, load_pairs("sentiment"))
    save_vector(vec, "pos.safetensors")
    ts.generate(lm, "The hotel was", controls=[steer(vec, 0.2)])
"""

from tokensteer.steering.apply import Steer, SteeringControl, required_capabilities, steer, steering_controls
from tokensteer.steering.gguf_io import export_gguf, from_repeng, import_gguf
from tokensteer.steering.pairs import Pair, PairSet, load_pairs, shipped_names
from tokensteer.steering.train import train_vector
from tokensteer.steering.vecfile import SteeringVector, load_vector, save_vector

__all__ = [
    "Pair", "PairSet", "Steer", "SteeringControl", "SteeringVector", "export_gguf", "from_repeng",
    "import_gguf", "load_pairs", "load_vector", "required_capabilities", "save_vector", "shipped_names",
    "steer", "steering_controls", "train_vector",
]
