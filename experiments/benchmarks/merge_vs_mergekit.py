"""`python -m warp_jax.merge` against mergekit's `nuslerp` on the same two checkpoints.

    python -m experiments.benchmarks.merge_vs_mergekit [--mergekit-venv .venv-mergekit]

Makes a random Gemma 2 checkpoint and two fine-tuned-like copies (init + noise), merges them
with our per-tensor SLERP of task vectors (M = 2, weights 0.5/0.5, eta 1) and with mergekit
(`merge_method: nuslerp`, the init as `base_model`, `nuslerp_flatten: true`), and prints the
largest difference per tensor and overall. mergekit runs in its own venv (not a project
dependency), created on first use.
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

from experiments.benchmarks.merging import ROOT, ensure_mergekit
from warp_jax import merge
from warp_jax.merge import TensorSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-venv", type=pathlib.Path, default=ROOT / ".venv-mergekit")
    args = parser.parse_args()
    python, note = ensure_mergekit(args.mergekit_venv)
    if python is None:
        sys.exit(f"mergekit unavailable: {note}")
    tmp = pathlib.Path(tempfile.mkdtemp())
    config = transformers.Gemma2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    model.save_pretrained(tmp / "init")
    for name in ("run0", "run1"):
        run = transformers.Gemma2ForCausalLM.from_pretrained(tmp / "init")
        with torch.no_grad():
            for p in run.parameters():
                p.add_(0.02 * torch.randn_like(p))
        run.save_pretrained(tmp / name)
    merge.merge(tmp / "init", [tmp / "run0", tmp / "run1"], tmp / "ours",
                granularity="tensor", progress=False)
    (tmp / "mergekit.yml").write_text(
        f"merge_method: nuslerp\nbase_model: {tmp / 'init'}\nmodels:\n"
        f"  - model: {tmp / 'run0'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp / 'run1'}\n    parameters: {{weight: 0.5}}\n"
        "parameters: {nuslerp_flatten: true}\ndtype: float32\n")
    subprocess.run([str(python.parent / "mergekit-yaml"), str(tmp / "mergekit.yml"),
                    str(tmp / "mergekit"), "--lazy-unpickle"], check=True,
                   capture_output=True)
    ours, theirs = TensorSource(tmp / "ours"), TensorSource(tmp / "mergekit")
    worst = 0.0
    print("| tensor | max abs diff | max abs value |\n|---|---:|---:|")
    for name in sorted(ours.shapes):
        a, b = ours.load([name])[name], theirs.load([name])[name]
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        worst = max(worst, diff)
        if "layers.0." in name or "layers" not in name:
            print(f"| {name} | {diff:.2e} | {float(np.max(np.abs(b))):.3f} |")
    print(f"\n{len(ours.shapes)} tensors; largest difference anywhere: {worst:.2e} "
          f"(float32 rounding)")


if __name__ == "__main__":
    main()
