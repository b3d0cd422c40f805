"""TokenSelect settings and the ``k=…,local=…,init=…,theta=…`` spec the CLI, API and server accept."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from tokensteer.errors import UserError

ON = ("on", "default", "true", "yes")
OFF = ("off", "none", "false", "no")
KEYS = ("k", "local", "init", "theta", "refresh", "chunk", "extrapolate", "tail")


@dataclass(frozen=True)
class KVSelectConfig:
    """Which KV entries a growing (full-attention) layer attends to, per step and head group.

    Each step attends to the first ``init`` tokens, the ``k`` tokens with the most attention mass
    (per-head softmax over q·k, summed over heads) and the last ``local`` tokens, its own included
    (a prompt chunk at least that long is its own local window). A decode query whose cosine with
    the previous step's query is ≥ ``theta`` reuses the last selection (``theta`` > 1: never), and
    a fresh one is made at least every ``refresh`` steps. This selection cache is off by default:
    a reused selection loses what a copied span (a number, a name) needs next. ``chunk`` tokens are
    prefilled per forward; with ``tail`` the prompt's last chunk (usually the question) attends to
    everything, so the first answer token reads the whole prompt. ``extrapolate`` re-indexes the
    selected keys' positions so prompts past the model's trained length fit its position range
    (the last chunk then selects too).
    """

    k: int = 2048
    local: int = 512
    init: int = 128
    theta: float = 2.0
    refresh: int = 16
    chunk: int = 512
    extrapolate: bool = False
    tail: bool = True

    def __post_init__(self) -> None:
        for name in ("k", "local", "chunk", "refresh"):
            if getattr(self, name) < 1:
                raise UserError(f"kv-select {name} must be ≥ 1, got {getattr(self, name)}")
        if self.init < 0:
            raise UserError(f"kv-select init must be ≥ 0, got {self.init}")
        if not 0.0 <= self.theta <= 2.0:
            raise UserError(f"kv-select theta is a cosine threshold in [0, 1] (above 1: no reuse), got {self.theta}")

    @property
    def dense_tail(self) -> bool:
        """Whether the prompt's last chunk attends densely (not when positions are re-indexed)."""
        return self.tail and not self.extrapolate

    @property
    def budget(self) -> int:
        """KV entries one decode step attends to once selection is on."""
        return self.init + self.k + self.local

    def spec(self) -> str:
        """The spec string that parses back to this config (for logs, cache keys and results)."""
        return ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self))


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return repr(v) if isinstance(v, float) else str(v)


def parse_kv_select(spec: str | KVSelectConfig | dict | bool | None) -> KVSelectConfig | None:
    """``None``/"off" -> None (dense attention); "on" -> the defaults; "k=1024,theta=0.95" -> those
    settings over the defaults. A dict (the server's JSON) or a config passes through checked."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return KVSelectConfig()
    if isinstance(spec, KVSelectConfig):
        return spec
    if isinstance(spec, dict):
        return _from_pairs(list(spec.items()), str(spec))
    if not isinstance(spec, str):
        raise UserError(f"kv-select takes 'on', 'off' or k=…,local=…,init=…,theta=…; got {spec!r}")
    s = spec.strip().lower()
    if s in ON or s == "":
        return KVSelectConfig()
    if s in OFF:
        return None
    pairs = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise UserError(f"kv-select setting {part!r} needs NAME=VALUE (e.g. k=1024); names: {', '.join(KEYS)}")
        pairs.append((name.strip(), value.strip()))
    return _from_pairs(pairs, spec)


def _from_pairs(pairs: list[tuple[str, object]], spec: str) -> KVSelectConfig:
    kw: dict[str, object] = {}
    for name, value in pairs:
        if name not in KEYS:
            raise UserError(f"unknown kv-select setting {name!r} in {spec!r}; names: {', '.join(KEYS)}")
        if name in kw:
            raise UserError(f"kv-select setting {name!r} is given twice in {spec!r}")
        kw[name] = _value(name, value)
    return replace(KVSelectConfig(), **kw)


def _value(name: str, value: object) -> object:
    text = str(value).strip().lower()
    if name in ("extrapolate", "tail"):
        if isinstance(value, bool) or text in ON + OFF:
            return value if isinstance(value, bool) else text in ON
        raise UserError(f"kv-select {name} is on or off, got {value!r}")
    if name == "theta":
        if text in OFF:
            return 2.0  # no cosine reaches it: every step selects afresh
        try:
            return float(text)
        except ValueError:
            raise UserError(f"kv-select theta must be a number (a cosine, e.g. 0.9) or off, got {value!r}") from None
    if isinstance(value, bool):
        raise UserError(f"kv-select {name} must be a whole number, got {value!r}")
    try:
        return int(text)
    except ValueError:
        raise UserError(f"kv-select {name} must be a whole number, got {value!r}") from None


def looks_like_spec(text: str) -> bool:
    """Whether a command-line word is a kv-select value (so a bare ``--kv-select`` does not eat a prompt)."""
    t = text.strip().lower()
    return t in ON + OFF or ("=" in t and t.split("=", 1)[0].strip() in KEYS)


def bare_option(args: list[str], option: str = "--kv-select") -> list[str]:
    """Command-line words with a bare ``--kv-select`` (last, or before a word that is not a
    kv-select value: an option, the prompt) written as ``--kv-select=on``."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--":  # everything after is positional
            return out + args[i:]
        if a == option and (i + 1 == len(args) or not looks_like_spec(args[i + 1])):
            out.append(f"{option}=on")
        else:
            out.append(a)
        i += 1
    return out
