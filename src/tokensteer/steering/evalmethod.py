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
            from tokensteer.steering.apply import SteeringControl, steer_from_spec

            self._controls = [SteeringControl([steer_from_spec(self.spec, lm)])]
        return self._controls

    def needs(self) -> frozenset[str]:
        from tokensteer.steering.apply import steer_from_spec, steer_needs

        return steer_needs(steer_from_spec(self.spec))


def make(arg: str | None) -> Method:
    """``arg`` is ``PATH@STRENGTH``, ``PATH:STRENGTH`` or ``PATH`` (the file's recommended strength)."""
    if not arg:
        raise UserError("the steer method needs a vector file: --method steer:VEC.safetensors@0.3")
    return SteerMethod(f"steer:{arg}", arg)
