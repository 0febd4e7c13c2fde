"""Sampler throughput: `warp_jax.sampling.sample` vs `transformers`' `generate`, same weights.

    python -m experiments.benchmarks.sampling [--repeats 5] [--sizes tiny,100m]
                                              [--top-k K] [--top-p P] [--family gemma2]
                                              [--batch B] [--prompt P] [--new N]
                                              [--dtype bfloat16] [--torch-device cuda]
                                              [--backends xla,cpu] [--json OUT.json]

Both sample with temperature 0.9, from the full distribution unless `--top-k` / `--top-p`
restrict both, and always produce `max_new_tokens` tokens (HF: `min_new_tokens =
max_new_tokens`). Each repeat times one call of each, back to back; the ratio is the median
of these paired ratios. `--family gemma2` / `gemma3` gives the sizes Gemma 2's (alternating
local/global attention, soft-caps) or Gemma 3's (5:1 local/global, QK-norm) features, with a
sliding window of 32, shorter than the sequences; transformers then runs Gemma 2 with eager
attention, which it needs for the soft-caps. Utilisation compares the achieved FLOP/s (2 FLOPs
per weight per token, prefill and decode) with a measured matmul in the compute dtype, and the
decode's weight traffic (every weight read once per step, at the compute dtype's width) with a
measured copy (numpy on CPU, a jitted copy on an accelerator).

`--dtype bfloat16` computes in bfloat16 on both sides: warp_jax from float32 weights (as the
trained policy keeps them), transformers from the same weights in bfloat16. PyTorch runs where
JAX does (`--torch-device auto`: CUDA when JAX runs on a GPU), and on a GPU both sides compute
float32 matmuls in TensorFloat-32.

Each sampler backend in `--backends` (default: the plain XLA one, `sample`'s default on
accelerators, and the opt-in CPU one, its default on the CPU) gets its own column and ratio,
timed in the same repeats. `--json` also writes the rows and the header as JSON, from which
docs/performance.md's tables are made.
"""

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from experiments.benchmarks._machine import device_description, stamp
from warp_jax import sampling
from warp_jax.backends import cpu as cpu_backend
from warp_jax.gemma import Gemma, GemmaConfig, hf

SIZES = {
    "tiny": (dict(vocab_size=8192, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=1,
                  head_dim=64, mlp_dim=1024), 32),
    "100m": (dict(vocab_size=32_000, embed_dim=768, num_layers=8, num_heads=12,
                  num_kv_heads=12, head_dim=64, mlp_dim=3072), 8),
}
FAMILIES = {
    "gemma": {},
    "gemma2": dict(family="gemma2", attention_pattern="alternating", sliding_window=32,
                   use_post_attn_norm=True, use_post_ffw_norm=True, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0),
    "gemma3": dict(family="gemma3", attention_pattern="local_global_5_1", sliding_window=32,
                   use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
                   rope_base=1_000_000.0, rope_local_base=10_000.0),
}
PROMPT, NEW, TEMPERATURE = 16, 48, 0.9


def _matmul_flops(dtype: str = "float32") -> float:
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(10):
        out = f(a)
    out.block_until_ready()
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def _sizes(parser: argparse.ArgumentParser, text: str, known) -> list[str]:
    """The comma list `--sizes`, each checked against `known` (a usage error otherwise)."""
    names = text.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {sorted(known)}")
    return names


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where PyTorch runs (auto: CUDA when JAX runs on a GPU)")


def _torch_device(args: argparse.Namespace) -> torch.device:
    """PyTorch's device for `--torch-device`. On CUDA, both sides compute float32 matmuls in
    TensorFloat-32, so that they do the same arithmetic."""
    choice = args.torch_device
    if choice == "auto":
        choice = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --torch-device cuda: PyTorch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    return torch.device(choice)


def _synchronize(device: torch.device) -> None:
    """Waits for PyTorch's queued work on `device`, so that a timer sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _add_malloc_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (see warp_jax.backends.cpu)")


def _set_malloc(args: argparse.Namespace) -> str:
    """Applies `--default-malloc` (before JAX starts) and says what was run, for the header."""
    retained = not args.default_malloc and cpu_backend.retain_freed_memory()
    return ("freed memory retained (backends.cpu.retain_freed_memory), for both" if retained
            else "freed memory returned to the OS")


def _copy_bandwidth() -> float:
    """Bytes read and written per second by a copy: numpy's on CPU (XLA:CPU's is no faster),
    a jitted one of a 1 GiB array on an accelerator."""
    if jax.default_backend() == "cpu":
        x = np.ones(64 * 2**20, np.float32)
        y = np.empty_like(x)
        np.copyto(y, x)
        start = time.perf_counter()
        for _ in range(10):
            np.copyto(y, x)
        return 10 * 2 * x.nbytes / (time.perf_counter() - start)
    x = jnp.ones(256 * 2**20, jnp.float32)
    copy = jax.jit(lambda v: v + 1)
    copy(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(10):
        out = copy(x)
    out.block_until_ready()
    return 10 * 2 * x.nbytes / (time.perf_counter() - start)


def _bench(name, cfg, batch, prompt, new, repeats, peak_flops, bandwidth, top_k, top_p,
           device, backends):
    model = Gemma(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = nn.unbox(params)
    attention = "eager" if cfg.attn_logit_softcap is not None else "sdpa"
    torch_model = transformers.AutoModelForCausalLM.from_config(
        hf.config_to_hf(cfg), attn_implementation=attention).eval()
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in
                                 hf.params_to_hf(params, cfg).items()})
    torch_model.to(device=device, dtype=getattr(torch, cfg.dtype))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(batch, prompt)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[::2, : prompt // 4] = False  # left padding on every other row
    tokens[~mask] = cfg.pad_id
    jtokens, jmask = jnp.asarray(tokens), jnp.asarray(mask)

    def ours(backend, seed):
        out = sampling.sample(params, cfg, jtokens, jmask, jax.random.key(seed), new,
                              temperature=TEMPERATURE, top_k=top_k, top_p=top_p,
                              backend=backend)
        return jax.block_until_ready(out)

    t_tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)
    t_mask = torch.from_numpy(mask.astype(np.int64)).to(device)

    def theirs():
        with torch.no_grad():
            out = torch_model.generate(
                input_ids=t_tokens, attention_mask=t_mask, do_sample=True,
                temperature=TEMPERATURE, top_k=top_k or 0, top_p=top_p or 1.0,
                max_new_tokens=new, min_new_tokens=new, pad_token_id=cfg.pad_id)
        _synchronize(device)
        return out

    compile_s = {}
    for backend in backends:
        start = time.perf_counter()
        ours(backend, 0)
        compile_s[backend] = time.perf_counter() - start
    theirs()
    times: dict[str, list[float]] = {b: [] for b in (*backends, "hf")}
    for r in range(repeats):
        for backend in backends:
            start = time.perf_counter()
            ours(backend, r + 1)
            times[backend].append(time.perf_counter() - start)
        start = time.perf_counter()
        out = theirs()
        times["hf"].append(time.perf_counter() - start)
        assert out.shape == (batch, prompt + new)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    flops = 2 * n_params * batch * (prompt + new)
    weight_bytes = jnp.dtype(cfg.dtype).itemsize * n_params * new  # the sampler's cast weights
    row = dict(name=name, params=n_params, batch=batch,
               hf=batch * new / statistics.median(times["hf"]), backends={})
    for backend in backends:
        t = statistics.median(times[backend])
        row["backends"][backend] = dict(
            tok_s=batch * new / t, compile_s=compile_s[backend],
            ratio=statistics.median(h / o for o, h in zip(times[backend], times["hf"],
                                                           strict=True)),
            flops=flops / t / peak_flops, bandwidth=weight_bytes / t / bandwidth)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,100m", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling, both sides")
    parser.add_argument("--top-p", type=float, default=None, help="top-p sampling, both sides")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gemma",
                        help="the Gemma generation whose features the sizes get")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch for every size (default: 32 tiny, 8 100m)")
    parser.add_argument("--prompt", type=int, default=PROMPT, help="prompt length")
    parser.add_argument("--new", type=int, default=NEW, help="new tokens per row")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both sides (warp_jax's weights stay float32)")
    parser.add_argument("--backends", default="xla,cpu",
                        help=f"comma list of sampler backends, from {sampling.BACKENDS[1:]}")
    parser.add_argument("--json", help="also write the header and rows to this JSON file")
    _add_device_flag(parser)
    _add_malloc_flag(parser)
    args = parser.parse_args()
    sizes = _sizes(parser, args.sizes, SIZES)
    for flag in ("batch", "prompt", "new"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    backends = args.backends.split(",")
    if not backends or any(b not in sampling.BACKENDS[1:] for b in backends):
        parser.error(f"--backends: {args.backends!r}; use a comma list of "
                     f"{sampling.BACKENDS[1:]}")
    malloc = _set_malloc(args)  # before JAX starts
    device = _torch_device(args)
    torch.manual_seed(0)
    peak, bandwidth = _matmul_flops(args.dtype), _copy_bandwidth()
    header = [f"JAX {jax.__version__} ({device_description()}), torch {torch.__version__} "
              f"on {device} ({torch.get_num_threads()} threads), "
              f"transformers {transformers.__version__}; {stamp()}",
              f"measured: {args.dtype} matmul {peak / 1e9:.1f} GFLOP/s, copy "
              f"{bandwidth / 1e9:.1f} GB/s; family {args.family}, prompt {args.prompt}, "
              f"{args.new} new tokens, temperature {TEMPERATURE}, top-k {args.top_k}, "
              f"top-p {args.top_p}, {args.repeats} repeats; {malloc}"]
    print("\n".join(header))
    print("\n| config | params | batch | HF generate tok/s | "
          + " | ".join(f"{b}: tok/s | {b}: ratio | {b}: compile s | {b}: FLOP/s used | "
                       f"{b}: bandwidth used" for b in backends) + " |")
    print("|---|---:|---:|---:|" + "---:|" * 5 * len(backends), flush=True)
    rows = []
    for name in sizes:  # each row as soon as it is measured
        fields, batch = SIZES[name]
        cfg = GemmaConfig(**fields, **FAMILIES[args.family], dtype=args.dtype)
        r = _bench(name, cfg, args.batch or batch, args.prompt, args.new, args.repeats,
                   peak, bandwidth, args.top_k, args.top_p, device, backends)
        rows.append(r)
        cells = [f"{b['tok_s']:.0f} | {b['ratio']:.1f}x | {b['compile_s']:.1f} | "
                 f"{b['flops']:.0%} | {b['bandwidth']:.0%}" for b in r["backends"].values()]
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['hf']:.0f} | "
              + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
