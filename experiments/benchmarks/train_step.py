"""REINFORCE train-step throughput, and the policy-gradient update against PyTorch.

    python -m experiments.benchmarks.train_step [--repeats 5] [--sizes tiny,100m]
                                                [--torch-device cuda]

Part 1, the whole WARP step split into its phases (each jitted on its own here, so they can
be timed; the reward is a constant): sampling K completions (`trainer.rollout`), and the
update (`trainer.update`: the anchor's forward, the policy's forward + backward, Adam, EMA).
Part 2, the policy-gradient update alone on fixed sequences (forward, backward and Adam) in
JAX and in PyTorch on transformers' `GemmaForCausalLM` with the same weights and batch. PyTorch runs
it as TRL does (the whole sequence, `logits_to_keep=NEW + 1`, the last logits dropped);
warp_jax feeds the PROMPT + NEW - 1 tokens that predict the completion and runs the last
block's queries and MLP and the vocabulary projection on the NEW predicting positions only.
After two warm-up pairs, each repeat times one step of each back to back, alternating which
goes first; the ratio is the median of the paired ratios. Model FLOP utilisation counts the
matmul FLOPs the computation needs (`_forward_flops`: 2 per weight per token forward, 4
backward) against a measured float32 matmul. Both run in one process; by default glibc keeps
freed memory for reuse (`warp_jax.backends.cpu.retain_freed_memory`), which speeds up both;
`--default-malloc` leaves it as it is. PyTorch runs where JAX does (`--torch-device auto`:
CUDA when JAX runs on a GPU, where both compute float32 matmuls in TensorFloat-32).
"""

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from experiments.benchmarks._machine import device_description, stamp
from experiments.benchmarks.sampling import (
    _add_device_flag,
    _add_malloc_flag,
    _matmul_flops,
    _set_malloc,
    _sizes,
    _synchronize,
    _torch_device,
)
from warp_jax import reinforce
from warp_jax.gemma import Gemma, GemmaConfig, hf

SIZES = {
    "tiny": (dict(vocab_size=8192, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=1,
                  head_dim=64, mlp_dim=1024), 8),
    "100m": (dict(vocab_size=32_000, embed_dim=768, num_layers=8, num_heads=12,
                  num_kv_heads=12, head_dim=64, mlp_dim=3072), 8),
}
PROMPT, NEW = 64, 64  # 128 tokens per sequence


def _forward_flops(cfg: GemmaConfig, n_params: int, rows: int, fed: int, kept: int) -> float:
    """The matmul FLOPs a forward pass needs for the logits of the last `kept` of `fed`
    tokens: 2 per weight per token, where every block but the last runs on all tokens, the
    last block's keys and values too, and its other weights, like the (tied) vocabulary
    projection, only on the kept tokens (as `Gemma(..., logits_to_keep=kept)` does)."""
    vocab = cfg.vocab_size * cfg.embed_dim
    block = (n_params - vocab) / cfg.num_layers  # the final norm's D weights count as a block's
    kv = 2 * cfg.embed_dim * cfg.num_kv_heads * cfg.head_dim
    per_row = block * (cfg.num_layers - 1) * fed + kv * fed + (block - kv + vocab) * kept
    return 2 * rows * per_row


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def _bench(name, fields, batch, repeats, peak, device):
    cfg = GemmaConfig(**fields)
    rl = reinforce.RLConfig(num_samples=2, max_new_tokens=NEW, learning_rate=1e-6)
    params = nn.unbox(Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch // 2, PROMPT)), jnp.int32)
    prompt_mask = jnp.ones_like(prompts, bool)
    state = jax.jit(lambda p: reinforce.init_state(p, rl))(params)

    sample = jax.jit(lambda s, k: reinforce.rollout(s, (prompts, prompt_mask), k, cfg=cfg, rl=rl))
    update = jax.jit(lambda s, b, r: reinforce.update(s, b, r, None, cfg=cfg, rl=rl),
                     donate_argnums=0)
    reward = jnp.zeros((batch,), jnp.float32)
    batch_data = sample(state, jax.random.key(0))
    # The warm-up finishes before any timer starts: the first timed sampling would wait for it.
    state, _ = jax.block_until_ready(update(state, batch_data, reward))
    phases = {"sampling": [], "update": []}
    for r in range(repeats):
        t, batch_data = _timed(sample, state, jax.random.key(r + 1))
        phases["sampling"].append(t)
        t, (state, _) = _timed(update, state, batch_data, reward)
        phases["update"].append(t)
    phase = {k: statistics.median(v) for k, v in phases.items()}
    step_s = sum(phase.values())
    tokens = batch * (PROMPT + NEW)
    # Sampling: the prefill (logits of its last position) and NEW - 1 one-token decode
    # steps; scoring: the anchor's forward over the PROMPT + NEW - 1 tokens that predict the
    # completion; update: the policy's forward and backward (twice the forward) over them.
    forward_flops = _forward_flops(cfg, n_params, batch, PROMPT + NEW - 1, NEW)
    sampling_flops = (_forward_flops(cfg, n_params, batch, PROMPT, 1)
                      + (NEW - 1) * _forward_flops(cfg, n_params, batch, 1, 1))
    step_flops = sampling_flops + forward_flops * (1 + 3)

    # Part 2: the policy-gradient update alone, JAX vs PyTorch.
    opt = optax.adam(1e-6)
    tokens_np = rng.integers(3, cfg.vocab_size, (batch, PROMPT + NEW)).astype(np.int64)
    adv_np = rng.normal(size=batch).astype(np.float32)

    def pg_loss(p, seq, adv):
        logp, _ = reinforce.completion_logprobs(cfg, p, seq[:, :PROMPT],
                                                jnp.ones((batch, PROMPT), bool), seq[:, PROMPT:],
                                                jnp.ones((batch, NEW), bool))
        return reinforce.reinforce_loss(logp, jnp.ones((batch, NEW), bool), adv)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # in place, like torch's Adam
    def pg_step(p, o, seq, adv):
        grads = jax.grad(pg_loss)(p, seq, adv)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    jparams = jax.tree.map(jnp.array, params)
    jopt = opt.init(jparams)
    seq, adv = jnp.asarray(tokens_np, jnp.int32), jnp.asarray(adv_np)
    jparams, jopt = pg_step(jparams, jopt, seq, adv)

    model = transformers.GemmaForCausalLM(hf.config_to_hf(cfg))
    model.load_state_dict({k: torch.tensor(v) for k, v in hf.params_to_hf(params, cfg).items()})
    model.to(device).train()
    torch_opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    t_seq, t_adv = torch.from_numpy(tokens_np).to(device), torch.from_numpy(adv_np).to(device)

    def torch_step():
        # As in warp_jax, the vocabulary projection runs on the positions that predict the
        # completion only (`logits_to_keep`).
        logits = model(input_ids=t_seq, logits_to_keep=NEW + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, t_seq[:, PROMPT:, None])[..., 0]
        loss = -(t_adv * logp.sum(-1)).mean()
        loss.backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)

    def timed_torch_step():
        start = time.perf_counter()
        torch_step()
        _synchronize(device)
        return time.perf_counter() - start

    pairs = []
    for r in range(2 + repeats):  # two warm-up pairs, once both sides hold their memory
        if r % 2:  # alternate who goes first, so neither always runs right after the other
            t_torch = timed_torch_step()
            t_jax, (jparams, jopt) = _timed(pg_step, jparams, jopt, seq, adv)
        else:
            t_jax, (jparams, jopt) = _timed(pg_step, jparams, jopt, seq, adv)
            t_torch = timed_torch_step()
        if r >= 2:
            pairs.append((t_jax, t_torch))
    t_jax = statistics.median(p[0] for p in pairs)
    t_torch = statistics.median(p[1] for p in pairs)
    pg_flops = 3 * forward_flops
    return dict(name=name, params=n_params, batch=batch, step_tok=tokens / step_s,
                mfu=step_flops / step_s / peak, **phase, jax_tok=tokens / t_jax,
                torch_tok=tokens / t_torch, ratio=statistics.median(b / a for a, b in pairs),
                pg_mfu=pg_flops / t_jax / peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,100m", help=f"comma list of {sorted(SIZES)}")
    _add_device_flag(parser)
    _add_malloc_flag(parser)
    args = parser.parse_args()
    sizes = _sizes(parser, args.sizes, SIZES)
    malloc = _set_malloc(args)
    device = _torch_device(args)
    torch.manual_seed(0)
    peak = _matmul_flops()
    print(f"JAX {jax.__version__} ({device_description()}), torch {torch.__version__} "
          f"on {device} ({torch.get_num_threads()} threads); f32 matmul {peak / 1e9:.1f} "
          f"GFLOP/s; {PROMPT}+{NEW} tokens per sequence; median of {args.repeats}; {malloc}; "
          f"{stamp()}")
    print("\n| config | params | batch | step tok/s | MFU | sampling s | update s (with the "
          "anchor's scoring) |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for name in sizes:  # the phases' row as soon as a size is measured
        r = _bench(name, *SIZES[name], args.repeats, peak, device)
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['step_tok']:.0f} | "
              f"{r['mfu']:.0%} | {r['sampling']:.3f} | {r['update']:.3f} |",
              flush=True)
        rows.append(r)
    print("\n| config | PG update, warp_jax tok/s | PyTorch tok/s | ratio (median) | MFU |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['jax_tok']:.0f} | {r['torch_tok']:.0f} | {r['ratio']:.2f}x | "
              f"{r['pg_mfu']:.0%} |")


if __name__ == "__main__":
    main()
