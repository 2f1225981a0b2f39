"""kunlun: Kunlun-style recommendation ranking models, trained and measured end to end.

Layers, lowest first; a module imports only from its own layer or the ones below it (enforced by
``tests/test_imports.py``, which holds the same list):

1. ``errors``, ``files``, ``processes``, ``console``, ``config``, ``model_configs`` — used by every layer, importing
   none of ours but each other (``config`` reads the ``model`` section into the config classes of ``model_configs``)
2. ``data`` — adapters, vocabularies and the prepared cache, then ``data.batches``
3. ``formats`` — low-precision ops: quantize → dequantize and the emulated GEMMs blocks run on
4. ``ops`` — hot operators (attention, GDPA, …), each a plain reference and a fast path behind one switch
5. ``blocks`` — embeddings, attention, summaries, interaction and Wukong layers
6. ``models`` — Kunlun and the baselines, built from blocks; ``models.registry`` builds one from a config
7. ``metrics`` — NE, logloss, AUC, gAUC, calibration as mergeable sums (numpy only; below training, whose loop
   early-stops on validation NE)
8. ``runs``, ``training`` — run records; the step (``training.step``), the loop, which early-stops on validation
   metrics, and whole jobs on a run directory (``training.runner``: train, resume, evaluate, predict)
9. ``serving`` — a trained run as one exported package (``torch.export`` / AOTInductor program + encoder), and
   the HTTP scoring server over it, encoding raw requests with the run's own encoder
10. ``scaling``, ``bench``, ``tuning`` — sweeps and scaling laws; speed, quality, ablation, format and serving
    benchmarks; hyper-parameter search (Optuna)
11. ``cli`` (and ``__main__``) — a thin layer of commands over the library
"""

import os

# Before torch starts its OpenMP pool (every module that uses torch imports it after this): a pool thread waiting for
# work sleeps instead of spinning. On a machine whose cores are busy with other work, spinning threads wait on a
# descheduled peer and burn the core it needs — a short training run took minutes instead of seconds
# (docs/results/speed.md#threads-on-a-busy-machine has the measurement). Set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kunlun.errors import KunlunError  # noqa: E402

try:  # written by setuptools-scm at build time: 0.1.1.devN+g<commit>[.d<date> when built from a dirty tree]
    from kunlun._version import __version__
except ImportError:  # running from a source tree that was never built
    __version__ = "0.1.0+unknown"
__all__ = ["KunlunError", "__version__"]
