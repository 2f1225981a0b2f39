"""Hot operators, each behind one call with a plain PyTorch reference and faster implementations.

Every op here has a ``reference`` implementation written as explicit matmuls and element-wise steps (what
the FLOP counter and the emulated low-precision GEMMs see) and a ``fast`` one (fused kernels such as
``scaled_dot_product_attention``, blocked layouts, fewer copies). One switch picks the implementation for
the whole process: ``train.ops`` in the config (``auto`` | ``fast`` | ``reference``), where ``auto`` reads
the environment variable ``KUNLUN_OPS`` and falls back to ``fast``. Tests in ``tests/test_ops.py`` hold
each fast path to its reference (forward and backward, random shapes, dtypes and ragged lengths).

A call that passes an emulated ``matmul`` (a low-precision format, ``kunlun.formats``) always runs the
reference: the fast kernels cannot quantize their inner products.
"""

from __future__ import annotations

import contextlib
import os

from kunlun.config import OPS
from kunlun.errors import KunlunError

IMPLS = tuple(name for name in OPS if name != "auto")
# until a config selects one: $KUNLUN_OPS when it names an implementation (a bad value is reported by ``use``)
_impl = os.environ.get("KUNLUN_OPS", "") if os.environ.get("KUNLUN_OPS", "") in IMPLS else "fast"


def use(name: str) -> str:
    """Select the implementation for every op: ``fast``, ``reference`` or ``auto`` ($KUNLUN_OPS, else fast).
    Returns the one selected."""
    global _impl
    if name == "auto":
        name = os.environ.get("KUNLUN_OPS", "") or "fast"
        where = "environment variable KUNLUN_OPS"
    else:
        where = "config key train.ops"
    if name not in IMPLS:
        raise KunlunError(f"{where}: expected one of {', '.join(IMPLS)}, got {name!r}")
    _impl = name
    return name


def current() -> str:
    return _impl



@contextlib.contextmanager
def using(name: str):
    """``with ops.using("reference"): …`` — the ops run ``name`` inside the block, the previous choice after it."""
    before = _impl
    use(name)
    try:
        yield
    finally:
        use(before)
