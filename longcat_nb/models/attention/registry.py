"""The registry of attention backends: one :class:`AttentionBackend` object per name.

The DiT's attention modules hold one of these objects and call its functions; nothing outside a
backend's own file compares backend names. The names a run's config may choose are config.py's
``model.attention`` choices (torch-free, so settings load without torch); :func:`load_builtin`
imports the module of that name from this package for each, and checks that it registered exactly
that name. A new backend is one file here plus its name in that list.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Option:
    """A setting of a backend that holds for the whole process (not per model): its value, the values
    it takes, and the environment variable that sets its starting value."""

    value: str
    choices: tuple
    env: str = ""

    def __post_init__(self):
        if self.env and os.environ.get(self.env):
            given = os.environ[self.env]
            if given not in self.choices:
                raise ValueError(f"{self.env}={given!r}: choose one of {self.choices}")
            self.value = given


def _never(grid) -> bool:
    return False


def _available() -> Optional[str]:
    return None


@dataclass(eq=False)
class AttentionBackend:
    """One attention backend.

    ``self_attention(q, k, v, grid_q, grid_k, params)``: q [B, H, Sq, D], k/v [B, H, Sk, D] of video
    tokens on (T, h, w) grids -> [B, H, Sq, D]; ``params`` is the model config's ``bsa_params`` (None:
    the backend's defaults). ``cross_attention(q, k, v, attn_mask)``: the text cross-attention; None
    = the ``sdpa`` backend's. ``unavailable()``: why it cannot run on this machine, or None.
    ``falls_back_per_call``: its functions run dense SDPA themselves where they cannot run (tensors off
    CUDA, single frames), so it stays selected when unavailable; otherwise ``sdpa`` is selected
    instead. ``kept_ops``: the op names ("ns::op") whose outputs selective checkpointing keeps (the
    expensive ones); ``strided_v(grid)``: whether its self-attention on ``grid`` takes a v that is a
    strided view (unit stride along D), sparing a copy. ``resolve(grid)``: for a backend that stands
    for others per grid (``auto``), the one that runs on ``grid``. ``note()``: a line logged when it
    is selected.
    """

    name: str
    description: str
    self_attention: Callable
    cross_attention: Optional[Callable] = None
    unavailable: Callable[[], Optional[str]] = _available
    falls_back_per_call: bool = False
    kept_ops: tuple = ()
    strided_v: Callable[[tuple], bool] = _never
    resolve: Optional[Callable[[tuple], "AttentionBackend"]] = None
    options: dict = field(default_factory=dict)
    note: Optional[Callable[[], Optional[str]]] = None

    def for_grid(self, grid) -> "AttentionBackend":
        """The backend that runs self-attention on a (T, h, w) grid: this one, or what it resolves to."""
        return self if self.resolve is None else self.resolve(grid)

    def option(self, key: str) -> str:
        return self.options[key].value

    def set_option(self, key: str, value: str) -> str:
        """Set one of ``options`` (process-wide); returns the previous value."""
        opt = self.options[key]
        if value not in opt.choices:
            raise ValueError(f"attention backend {self.name} option {key}={value!r}: choose one of {opt.choices}")
        previous, opt.value = opt.value, value
        return previous

    # a registered backend is one object per process: models copied with deepcopy share it and its options
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


_REGISTRY: dict[str, AttentionBackend] = {}
_KEPT_OPS: frozenset = frozenset()

# the checkpoint's flags name flash-attn kernels; torch SDPA runs FlashAttention-2 on CUDA in bf16
_FLASH_NAMES = ("flash_attn", "flash_attention_2", "flashattn2", "flashattn3", "flash_attention_3")


def register(backend: AttentionBackend) -> AttentionBackend:
    """Add (or replace) a backend under its name; returns it."""
    global _KEPT_OPS
    _REGISTRY[backend.name] = backend
    _KEPT_OPS = frozenset(op for b in _REGISTRY.values() for op in b.kept_ops)
    return backend


def unregister(name: str) -> None:
    global _KEPT_OPS
    _REGISTRY.pop(name, None)
    _KEPT_OPS = frozenset(op for b in _REGISTRY.values() for op in b.kept_ops)


def names() -> tuple:
    return tuple(_REGISTRY)


def get(name: str) -> AttentionBackend:
    """The backend registered as ``name`` (flash-attn names mean ``sdpa``)."""
    key = str(name).lower()
    key = "sdpa" if key in _FLASH_NAMES else key
    if key not in _REGISTRY:
        raise ValueError(f"attention_implementation={name!r} is not one of {names()}")
    return _REGISTRY[key]


def kept_ops() -> frozenset:
    """The op names whose outputs selective checkpointing keeps: every registered backend's."""
    return _KEPT_OPS


def cross_backend(backend: AttentionBackend) -> AttentionBackend:
    """The backend whose cross-attention ``backend`` runs (its own, or ``sdpa``'s)."""
    return backend if backend.cross_attention is not None else _REGISTRY["sdpa"]


def backend_from_config(attention_implementation, enable_xformers: bool, enable_bsa: bool) -> AttentionBackend:
    """The backend a checkpoint's config asks for: ``attention_implementation`` when set, else its flags."""
    if attention_implementation:
        return get(attention_implementation)
    return get("bsa" if enable_bsa else "xformers" if enable_xformers else "sdpa")


def select(backend) -> AttentionBackend:
    """The backend that will run for a requested one (object or name), with a log line saying why
    when that is another one or it will fall back per call."""
    backend = get(backend) if isinstance(backend, str) else backend
    why = backend.unavailable()
    if why is not None:
        if not backend.falls_back_per_call:
            logger.warning("attention %s: %s; using torch SDPA attention instead", backend.name, why)
            return _REGISTRY["sdpa"]
        logger.warning("attention %s: %s; using dense SDPA instead", backend.name, why)
    elif backend.note is not None and backend.note():
        logger.info("attention %s: %s", backend.name, backend.note())
    return backend


def availability(requested: str) -> dict:
    """Each backend with whether it can run here (and why not), and what ``requested`` will run:
    what notebook 00 shows."""
    rows = []
    for b in _REGISTRY.values():
        why = b.unavailable()
        rows.append({"backend": b.name, "available": "yes" if why is None else "no", "reason": why or "",
                     "what": b.description})
    chosen = select(requested)
    why = chosen.unavailable()
    note = chosen.note() if chosen.note is not None else None
    runs = chosen.name if why is None else f"{chosen.name} where it can, dense SDPA here ({why})"
    runs += f" ({note})" if note and why is None else ""
    return {"backends": rows, "summary": f"attention requested: {requested}  ->  will run: {runs}"}


def load_builtin(choices: tuple) -> None:
    """Import the module of each name in ``choices`` (config.py's list) and check it registered that name."""
    for name in choices:
        if name not in _REGISTRY:
            importlib.import_module(f"{__package__}.{name}")
        if name not in _REGISTRY:
            raise RuntimeError(f"{__package__}.{name} did not register an attention backend named {name!r}")
    for name in choices:  # listed in config.py's order
        _REGISTRY[name] = _REGISTRY.pop(name)
    extra = set(_REGISTRY) - set(choices)
    if extra:
        raise RuntimeError(f"attention backends {sorted(extra)} are registered but not in config.py's "
                           f"model.attention choices {choices}: add them there")
