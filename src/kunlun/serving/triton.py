"""A Triton Inference Server model repository for an exported package (``kunlun export … --triton DIR``).

Triton's PyTorch (libtorch) backend runs TorchScript, not PT2 packages, and the model needs its encoder to turn
raw requests into tensors; so the repository uses Triton's **Python backend**::

    DIR/<name>/config.pbtxt     backend "python", input REQUEST (a JSON string: one example, a list, or
                                {"examples": [...]}), output PROBABILITY (float32, one per example),
                                dynamic batching of requests
    DIR/<name>/1/model.pt2      the package, as exported
    DIR/<name>/1/model.py       loads it with ``kunlun.serving.export.load_scorer`` and scores the requests of
                                one Triton batch together, exactly as ``kunlun serve`` does

The Python environment Triton runs the backend in needs kunlun (and torch) installed. Not tested against a
Triton server here (it cannot be installed on this machine); ``model.py`` is tested with a stand-in for
``triton_python_backend_utils``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kunlun.errors import KunlunError
from kunlun.serving.export import read_meta

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{
    name: "REQUEST"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
output [
  {{
    name: "PROBABILITY"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
parameters: {{
  key: "runtime"
  value: {{ string_value: "{runtime}" }}
}}
"""

MODEL_PY = '''"""Triton Python backend for a kunlun package (written by `kunlun export --triton`): REQUEST is a JSON string
(one example, a list, or {"examples": [...]}); PROBABILITY holds one float32 per example, in request order."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kunlun.serving.examples import ExampleError, concat_examples, parse_examples
from kunlun.serving.export import load_scorer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        runtime = config.get("parameters", {}).get("runtime", {}).get("string_value", "auto")
        self.scorer = load_scorer(Path(args["model_repository"]) / args["model_version"] / "model.pt2", runtime)

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []
        for i, request in enumerate(requests):
            try:
                values = pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy().reshape(-1)
                if values.size != 1:
                    raise ValueError(f"REQUEST: expected one JSON string (shape [1, 1]), got {values.size}")
                text = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
                parsed.append((i, parse_examples(json.loads(text), self.scorer.encoder.schema)))
            except (ExampleError, ValueError) as exc:  # this request only; the others are scored
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
        if parsed:
            probs = self.scorer.score_examples(concat_examples([ex for _, ex in parsed]))
            start = 0
            for i, ex in parsed:
                out = probs[start : start + ex.n].astype(np.float32)[None, :]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROBABILITY", out)])
                start += ex.n
        return responses
'''


def write_model_repository(package: Path, repo: Path, name: str = "kunlun", max_batch: int = 64, delay_us: int = 2000,
                           runtime: str = "auto") -> Path:
    """Write ``repo/<name>`` (config, version 1 with the package and the backend); returns that folder."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise KunlunError(f"Triton model name {name!r}: use letters, digits, '_', '.', '-'")
    read_meta(package)  # a kunlun package, or a one-line error
    model_dir = repo / name
    if model_dir.exists() and any(model_dir.iterdir()):
        raise KunlunError(f"{model_dir}: already exists and is not empty")
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package, model_dir / "1" / "model.pt2")
    (model_dir / "1" / "model.py").write_text(MODEL_PY)
    (model_dir / "config.pbtxt").write_text(CONFIG.format(name=name, max_batch=max_batch, delay_us=delay_us, runtime=runtime))
    return model_dir
