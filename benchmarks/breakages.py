"""Deliberate breakages: each applied alone to a copy of src/, the tests that guard it run against the copy, and the
ones that fail are listed — a component whose breakage fails no test is not guarded.

    python benchmarks/breakages.py [--out benchmarks/results/breakages.md] [NAME-SUBSTRING ...]

Each breakage is one exact text replacement in one source file (it must match once; one that no longer matches is
reported as not applied). Runs with OMP_NUM_THREADS=1; about a minute per breakage on a 2-core CPU.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
MUTATIONS = {
 "seed pooling ignores the padding mask": ("blocks/summary.py",
    "return self.norm(self.seeds + self.attn(self.seeds, self.norm_kv(s), mask))",
    "return self.norm(self.seeds + self.attn(self.seeds, self.norm_kv(s), torch.ones_like(mask)))"),
 "GDPA-PFFN fed one batch-mean K/V": ("models/kunlun.py",
    "kv = self.static_kv.expand(x.shape[0], -1, -1) if self.static_kv is not None else x_sum",
    "kv = self.static_kv.expand(x.shape[0], -1, -1) if self.static_kv is not None else (x_sum.mean(0, keepdim=True).expand_as(x_sum) if x_sum is not None else None)"),
 "sliding window dropped inside MultiHeadAttention": ("blocks/attention.py",
    "softmax_attention(q, k, v, key_mask, self.window,", "softmax_attention(q, k, v, key_mask, 0,"),
 "PFFN loses its inner residual (+ q_n)": ("blocks/pffn.py", "head_mask=self.head_mask) + q_n", "head_mask=self.head_mask)"),
 "PFFN loses its output RMSNorm": ("blocks/pffn.py", "out = self.norm_out(h) + s", "out = h + s"),
 "rotary positions not applied": ("blocks/attention.py", "if tau is not None:\n            q, k = rotary(", "if False:\n            q, k = rotary("),
 "CompSkip ignored (every layer runs everything)": ("models/kunlun.py", "if not cfg.compskip or depth < cfg.compskip_min_layers:", "if True:"),
 "CompSkip runs attention on the wrong layers": ("models/kunlun.py", "return even, not even, even", "return even, even, even"),
 "event stream keeps every event type": ("blocks/embeddings.py", "sel = mask & (event == code)", "sel = mask"),
 "light streams not scaled": ("models/kunlun.py", "k = cfg.light_scale", "k = 1.0"),
 "every Wukong expert reads all tokens": ("blocks/wukong.py", "list(range(e, n_in, experts))", "list(range(n_in))"),
 "candidate token is zeros": ("blocks/embeddings.py", "return x + self.time(cat.new_zeros(1)) if self.time is not None else x", "return (x + self.time(cat.new_zeros(1)) if self.time is not None else x) * 0"),
 "attention key mask ignored": ("ops/attention.py", "def softmax_attention(\n    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, window: int = 0,\n    matmul=None,\n) -> torch.Tensor:\n", "def softmax_attention(\n    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, window: int = 0,\n    matmul=None,\n) -> torch.Tensor:\n    key_mask = torch.ones_like(key_mask)\n"),
 "InterFormer PFFN from the batch-mean summary": ("models/interformer.py", "w = self.generate(x_sum.flatten(1)).view(-1, self.dim, self.dim)", "w = self.generate(x_sum.flatten(1)).mean(0, keepdim=True).expand(x_sum.shape[0], -1).reshape(-1, self.dim, self.dim)"),
 "InterFormer interaction without the DOT products": ("models/interformer.py", "dots = self.matmul(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]", "dots = self.matmul(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]] * 0"),
 "InterFormer recent tokens unmasked": ("models/interformer.py", "recent = s[:, -k:] * mask[:, -k:, None]", "recent = s[:, -k:]"),
 "DIN weights softmax-normalised": ("blocks/interaction.py", "w = self.out(h).squeeze(-1) * mask.to(history.dtype)", "w = torch.softmax(self.out(h).squeeze(-1).masked_fill(~mask, -1e9), -1)"),
 "DIN Dice statistics over padded events": ("blocks/interaction.py", "h = act(layer(h), mask)", "h = act(layer(h))"),
 "DIN Dice without its alpha branch": ("blocks/interaction.py", "reshape(shape)\n            return p * x + (1 - p) * self.alpha * x", "reshape(shape)\n            return p * x"),
 "BST pre-norm instead of post-norm": ("models/bst.py", "s = self.norm1(s + self.drop(self.attn(s, s, mask, tau)))", "s = s + self.drop(self.attn(self.norm1(s), self.norm1(s), mask, tau))"),
 "DCNv2 cross multiplies x_l instead of x_0": ("blocks/interaction.py", "x = x0 * layer(x) + x", "x = x * layer(x) + x"),
 "Wukong layers each read the embeddings": ("models/wukong.py", "x = pooled_tokens(self.inputs, batch)\n        for layer in self.layers:\n            x = layer(x)", "x0 = x = pooled_tokens(self.inputs, batch)\n        for layer in self.layers:\n            x = layer(x0)"),
 "pooled history averages padding (DNN, DCNv2, Wukong)": ("blocks/embeddings.py", "m = mask.unsqueeze(-1).to(s.dtype)", "m = torch.ones_like(mask).unsqueeze(-1).to(s.dtype)"),
}
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("only", nargs="*", help="run only the breakages whose name contains one of these")
ap.add_argument("--out", type=Path, help="write the table (markdown) and the raw lists (.json beside it)")
args = ap.parse_args()
only = args.only
results = {}
work = tempfile.mkdtemp(prefix="kunlun-breakages-")
HOT_PATH_TESTS = ["tests/test_host_sync.py"]
MUTATIONS["Wukong experts index tokens with a Python list"] = ("blocks/wukong.py", "ex(x[:, e::self.experts_n])", "ex(x[:, list(range(e, x.shape[1], self.experts_n))])", HOT_PATH_TESTS)
MUTATIONS["per-head activation mask rebuilt from Python data each forward"] = ("blocks/pffn.py", "head_mask=self.head_mask) + q_n", "head_mask=None if self.head_mask is None else torch.tensor(self.head_mask.tolist(), device=s.device)) + q_n", HOT_PATH_TESTS)
MUTATIONS["InterFormer pairs index a plain CPU attribute"] = ("models/interformer.py", 'self.register_buffer("pairs", torch.triu_indices(self.nz, self.nz, offset=1), persistent=False)', "self.pairs = torch.triu_indices(self.nz, self.nz, offset=1)", HOT_PATH_TESTS)
TRAINING_TESTS = ["tests/test_training.py::test_training_learns", "tests/test_cli.py::test_train_json_is_metrics_by_split",
                  "tests/test_pinned_quality.py"]
MUTATIONS["optimizer never steps"] = ("training/step.py", "            o.step()\n            s.step()", "            s.step()", TRAINING_TESTS)
MUTATIONS["training reads labels shuffled within the batch"] = ("training/step.py", "return self.loss_fn(logits.float(), batch.label), logits", "return self.loss_fn(logits.float(), batch.label.roll(1)), logits", TRAINING_TESTS)
for name, spec in MUTATIONS.items():
    path, old, new = spec[:3]
    tests = spec[3] if len(spec) > 3 else ["tests/test_components.py", "tests/test_model_spec.py", "tests/test_blocks.py",
                                           "tests/test_flops.py"]
    if only and not any(o in name for o in only):
        continue
    if old is None:
        continue
    dst = f"{work}/src"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(f"{ROOT}/src", dst, ignore=shutil.ignore_patterns("__pycache__"))
    f = f"{dst}/kunlun/{path}"
    text = open(f).read()
    if text.count(old) != 1:
        results[name] = f"NOT APPLIED ({text.count(old)} matches)"
        print(name, results[name], flush=True)
        continue
    open(f, "w").write(text.replace(old, new))
    env = {**os.environ, "PYTHONPATH": dst, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+?)(?: - |$)", r.stdout, re.M)))
    results[name] = failed
    print(f"== {name}: {len(failed)} failing", *failed, sep="\n   ", flush=True)
shutil.rmtree(work, ignore_errors=True)
if args.out:
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"Deliberate breakages at {commit} (`python benchmarks/breakages.py --out {args.out}`): the tests each one fails.", "",
             "| breakage | file | tests that fail |", "|---|---|---|"]
    for name, failed in results.items():
        path = MUTATIONS[name][0]
        if isinstance(failed, str):
            lines.append(f"| {name} | {path} | {failed} |")
            continue
        tests = sorted({t.split("::")[0].removeprefix("tests/") + "::" + t.split("::")[1].split("[")[0] for t in failed})
        lines.append(f"| {name} | {path} | {len(failed)}: " + ", ".join(f"`{t}`" for t in tests) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
