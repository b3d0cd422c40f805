"""Apply steering vectors during generation: a ``Control`` whose hook-2 edits add scaled vectors.

Strength is in the vector's units (relative for trained vectors: a fraction of the layer's median
residual norm). Several vectors combine by summing per layer; a list of strengths gives one per
prompt of a batch. Mode ``gcav`` is GCAV's closed-form minimal push (torch only).

A ``guard`` p keeps the steered text fluent at stronger doses: tokens are sampled only among the
*unsteered* model's top-p nucleus (DExperts' base nucleus), read from a second, plain session
stepped in lockstep (so it works on llama.cpp too). It costs that second forward per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tokensteer.backends.base import RESIDUAL_ADD, RESIDUAL_FIRST, RESIDUAL_FN
from tokensteer.errors import UserError
from tokensteer.hooks import Control, EditContext, Positions, ResidualEdit
from tokensteer.steering.train import parse_layers
from tokensteer.steering.vecfile import SteeringVector, load_vector

POSITIONS = ("all", "prompt", "generated")
MODES = ("add", "gcav")
MAX_STRENGTH = 10.0  # ten times the residual norm: the stream would be the vector and nothing else


def dose(vector: torch.Tensor, strength: float) -> torch.Tensor:
    """``strength × vector`` in float32: the one place a dose is computed (GGUF export uses it too)."""
    return vector.to(torch.float32) * torch.tensor(strength, dtype=torch.float32)


@dataclass
class Steer:
    """One vector to apply: at which layers, how strongly, where, and how."""

    vector: SteeringVector
    strength: float | Sequence[float] | None = None  # None: the file's recommendation; a list: one per prompt
    layers: Sequence[int] | None = None  # None: the file's recommended layers
    positions: Positions = "all"
    mode: str = "add"
    guard: float | None = None  # sample only within the unsteered model's top-p nucleus (see module doc)

    def __post_init__(self) -> None:
        if self.guard is not None and not (math.isfinite(self.guard) and 0 < self.guard <= 1):
            raise UserError(f"guard must be a top-p in (0, 1], got {self.guard:g}")
        if self.positions not in POSITIONS:
            raise UserError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if self.mode not in MODES:
            raise UserError(f"unknown steering mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.strength is None:
            self.strength = self.vector.recommended_strength
        if self.layers is None:
            self.layers = self.vector.recommended_layers
        missing = [i for i in self.layers if i not in self.vector.vectors]
        if missing:
            raise UserError(f"the vector has no direction for layer(s) {missing}; it has {self.vector.layers}")
        if self.mode == "add":
            for x in self._strengths():
                if not math.isfinite(x) or abs(x) > MAX_STRENGTH:
                    raise UserError(
                        f"strength {x:g} is out of range: it is a fraction of the layer's typical residual "
                        f"norm (0.05-0.3 is usual; |strength| ≤ {MAX_STRENGTH:g})"
                    )
        if self.mode == "gcav":
            lacking = [i for i in self.layers if i not in self.vector.probes]
            if lacking:
                raise UserError(f"mode gcav needs probe weights, which this vector file lacks for layer(s) {lacking} (retrain it)")
            for p in self._strengths():
                if not 0 < p < 1:
                    raise UserError(f"mode gcav takes a target probability in (0, 1) as its strength, got {p}")

    def _strengths(self) -> list[float]:
        s = self.strength
        return [float(x) for x in s] if isinstance(s, (list, tuple)) else [float(s)]

    @property
    def per_row(self) -> bool:
        return isinstance(self.strength, (list, tuple))


def gcav_fn(w: torch.Tensor, b: float, p0: torch.Tensor):
    """GCAV minimal push: move each hidden state along w/‖w‖ just enough that σ(w·h+b) ≥ p0."""
    norm = float(w.norm())
    unit = w / norm
    target = torch.log(p0) - torch.log1p(-p0)  # [N]

    def fn(hidden: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        logit = hidden.float() @ w + b  # [N, T]
        eps = ((target[:, None] - logit) / norm).clamp(min=0)
        return hidden + (eps[..., None] * unit).to(hidden.dtype)

    return fn


@dataclass
class SteeringControl(Control):
    """Adds steering vectors to the residual stream (the ``edits`` stage); one control for any number of vectors."""

    stages = frozenset({"edits"})

    steers: list[Steer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.requires = frozenset({RESIDUAL_FN}) if any(not _uniform(s) for s in self.steers) else frozenset()

    def residual_edits(self, n_rows: int, rows_per_prompt: int) -> Sequence[ResidualEdit]:
        n_prompts = n_rows // rows_per_prompt
        parts: dict[tuple[int, str], list[torch.Tensor]] = {}
        edits: list[ResidualEdit] = []
        for s in self.steers:
            strengths = s._strengths()
            if s.per_row and len(strengths) != n_prompts:
                raise UserError(f"{len(strengths)} per-prompt strengths given for {n_prompts} prompts")
            if all(x == 0 for x in strengths) and s.mode == "add":
                continue  # strength 0 is exactly no steering
            for layer in s.layers:
                if s.mode == "gcav":
                    w, b = s.vector.probes[layer][:-1], float(s.vector.probes[layer][-1])
                    p0 = torch.tensor(strengths if s.per_row else strengths * n_prompts, dtype=torch.float32)
                    fn = gcav_fn(w, b, p0.repeat_interleave(rows_per_prompt))
                    edits.append(ResidualEdit(layer, fn=fn, positions=s.positions))
                    continue
                u = s.vector.vectors[layer]
                if s.per_row:
                    v = torch.stack([dose(u, x) for x in strengths]).repeat_interleave(rows_per_prompt, dim=0)
                else:
                    v = dose(u, strengths[0])
                parts.setdefault((layer, s.positions), []).append(v)
        for (layer, pos), vs in sorted(parts.items()):
            if len(vs) == 1:
                v = vs[0]
            elif all(x.dim() == 1 for x in vs):
                v = torch.stack(vs).sum(dim=0)
            else:
                v = torch.stack([x.expand(n_rows, -1) for x in vs]).sum(dim=0)
            edits.append(ResidualEdit(layer, vector=v, positions=pos))
        return edits


class SteerGuard(Control):
    """Sample only among the unsteered model's top-p tokens (see the module doc): a plain session
    of the same backend, prefilled with the prompts and fed every accepted token."""

    label = "a steering guard (guard=)"
    stages = frozenset({"rewrite", "accept"})

    def __init__(self, p: float) -> None:
        self.p = p
        self._plain = None

    def start(self, state) -> None:
        self.finish()
        self._plain = state.backend.session(())
        self._lp = torch.log_softmax(self._plain.prefill(state.prompt_tokens).float(), -1)

    def logprobs(self, state, logprobs: torch.Tensor) -> torch.Tensor:
        from tokensteer.sampling import nucleus_mask

        keep = nucleus_mask(self._lp, self.p)
        return torch.log_softmax(logprobs.masked_fill(~keep, float("-inf")), -1)

    def on_token(self, state, tokens: torch.Tensor) -> None:
        self._lp = torch.log_softmax(self._plain.step(tokens).float(), -1)

    def finish(self) -> None:
        if self._plain is not None:
            self._plain.close()
            self._plain = None


def controls_for(steers: Sequence[Steer]) -> list[Control]:
    """The controls that apply ``steers``: their residual edits, and a guard when any asks for one
    (the tightest top-p wins)."""
    guards = [s.guard for s in steers if s.guard is not None]
    return [SteeringControl(list(steers))] + ([SteerGuard(min(guards))] if guards else [])


def _uniform(s: Steer) -> bool:
    return s.mode == "add" and s.positions == "all" and not s.per_row


def parse_spec(spec: str) -> tuple[str, dict]:
    """``VEC[:STRENGTH][:key=value...]`` or ``VEC@STRENGTH``; keys: layers, at (positions), mode, guard."""
    if not spec.strip():
        raise UserError("empty --steer value; write VEC or VEC:STRENGTH")
    path, rest = _split_path(spec)
    opts: dict = {}
    for part in rest:
        if "=" in part:
            k, v = part.split("=", 1)
            if k not in ("layers", "at", "mode", "guard"):
                raise UserError(f"unknown steering option {k!r} in {spec!r}; use layers=, at=, mode= or guard=")
            opts[k] = v
            if k == "guard":
                try:
                    opts[k] = float(v)
                except ValueError:
                    raise UserError(f"bad guard {v!r} in {spec!r}; write guard=0.8 (a top-p of the unsteered model)") from None
        elif part:
            try:
                opts["strength"] = float(part)
            except ValueError:
                raise UserError(f"bad strength {part!r} in {spec!r}; write VEC:0.1") from None
            if not math.isfinite(opts["strength"]):
                raise UserError(f"strength must be a finite number, got {part!r}")
    return path, opts


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except RuntimeError:  # ~name of an unknown user
        return False


def _split_path(spec: str) -> tuple[str, list[str]]:
    """The vector path and the ``:``-separated options after it. The path is the longest prefix
    that names an existing file (paths may hold ``:`` or ``@``); ``PATH@STRENGTH`` also works."""
    parts = spec.split(":")
    for k in range(len(parts), 0, -1):
        head = ":".join(parts[:k])
        if _exists(head):
            return head, parts[k:]
        if "@" in parts[k - 1] and _exists(head.rsplit("@", 1)[0]):  # PATH@STRENGTH[:...]
            head, s = head.rsplit("@", 1)
            return head, [s, *parts[k:]]
    path, *rest = parts  # nothing exists: split at the first ':' so the error names the file
    if "@" in path:
        path, s = path.rsplit("@", 1)
        rest = [s, *rest]
    return path, rest


def steer_from_spec(spec: str, lm=None) -> Steer:
    """Build a Steer from a CLI/API spec string; with ``lm`` also check the vector fits the model."""
    path, opts = parse_spec(spec)
    vec = load_vector(path)
    if lm is not None:
        vec.check_model(lm)
    n_layers = lm.n_layers if lm is not None else vec.meta.get("model", {}).get("n_layers", max(vec.layers) + 1)
    layers = parse_layers(opts.get("layers"), n_layers) if "layers" in opts else None
    rec = vec.meta.get("recommended", {})
    return Steer(vec, opts.get("strength"), layers, opts.get("at", rec.get("positions", "all")), opts.get("mode", "add"),
                 opts.get("guard", rec.get("guard")))


def steering_controls(lm, req) -> list[Control]:
    """The Controls for ``req.steer`` (a list of ``VEC[:strength]`` strings) on a loaded backend."""
    steers = [steer_from_spec(s, lm) for s in req.steer]
    return controls_for(steers) if steers else []


def required_capabilities(req) -> frozenset[str]:
    """Backend capabilities ``req.steer`` needs: residual_add for uniform additive vectors, else residual_fn;
    residual_first_layer when a vector acts on layer 0."""
    return frozenset().union(*(steer_needs(steer_from_spec(spec)) for spec in req.steer))


def steer_needs(s: Steer) -> frozenset[str]:
    """The backend capabilities one Steer needs."""
    return frozenset({RESIDUAL_ADD if _uniform(s) else RESIDUAL_FN} | ({RESIDUAL_FIRST} if 0 in s.layers else set()))


def steer(vector: SteeringVector | str, strength: float | Sequence[float] | None = None, **kw) -> SteeringControl:
    """Python shortcut: ``ts.generate(lm, p, controls=[steer("vec.safetensors", 0.1)])``."""
    vec = load_vector(vector) if isinstance(vector, (str, Path)) else vector
    return SteeringControl([Steer(vec, strength, **kw)])
