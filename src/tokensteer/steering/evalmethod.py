"""The ``steer`` method of the evaluation suite: ``steer:PATH@STRENGTH`` (or ``steer:PATH``)."""

from __future__ import annotations

from tokensteer.errors import UserError
from tokensteer.eval.methods import Method


class SteerMethod(Method):
    """Generate with a steering vector applied; one control list shared by every item (one batch)."""

    def __init__(self, name: str, spec: str) -> None:
        super().__init__(name)
        self.spec = spec
        self._controls = None
        self._uniform = None

    def controls(self, lm, task, item):
        if self._controls is None:
            from tokensteer.steering.apply import controls_for, steer_from_spec

            self._controls = controls_for([steer_from_spec(self.spec, lm)])
        return self._controls

    def vary(self, param: str, value: str) -> Method:
        """``--sweep strength=...`` sets the strength of any spelling (``VEC``, ``VEC@S``, ``VEC:S:layers=...``),
        keeping the other options and a path that holds ``@`` or ``:``."""
        if param != "strength" or "{" in self.spec:
            return super().vary(param, value)
        from tokensteer.eval.methods import make_method
        from tokensteer.steering.apply import parse_spec

        path, opts = parse_spec(self.spec)
        rest = "".join(f":{k}={v}" for k, v in opts.items() if k != "strength")
        sep = "@" if self.spec[len(path):].startswith("@") else ":"  # keep the user's spelling (and cache keys)
        return make_method(f"steer:{path}{sep}{value}{rest}")

    def needs(self) -> frozenset[str]:
        from tokensteer.steering.apply import steer_from_spec, steer_needs

        return steer_needs(steer_from_spec(self.spec))


def make(arg: str | None) -> Method:
    """``arg`` is ``PATH@STRENGTH``, ``PATH:STRENGTH`` or ``PATH`` (the file's recommended strength)."""
    if not arg:
        raise UserError("the steer method needs a vector file: --method steer:VEC.safetensors@0.3")
    return SteerMethod(f"steer:{arg}", arg)
