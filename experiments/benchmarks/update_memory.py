"""What `RLConfig.microbatches` and `RLConfig.remat` cost and save in the REINFORCE update.

    python -m experiments.benchmarks.update_memory [--sizes tiny,100m] [--repeats 3]

For each setting, the update as the train step runs it (the EMA anchor's log-probs, then the
policy's forward, backward, Adam and the EMA update) on 16 sampled sequences of 64 + 64 tokens
(8 prompts, K = 2), jitted on its own: XLA's temporary memory for it and its median time, each
against the plain update (m = 1, no remat) in the same run. Temporary memory is what
`memory_analysis` counts besides the inputs and outputs: XLA may also place temporaries in
output buffers that are written only at the end (the new params and Adam state), so a small
enough microbatch can bring it near 0. XLA:CPU does not turn remat into less memory; the
column shows what this backend does. As in the other benchmarks, freed memory is retained by
default (`--default-malloc` leaves glibc as it is).
"""

import argparse
import dataclasses
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._machine import device_description, stamp
from experiments.benchmarks.sampling import _add_malloc_flag, _set_malloc, _sizes
from experiments.benchmarks.train_step import NEW, PROMPT, SIZES
from warp_jax import reinforce
from warp_jax.gemma import Gemma, GemmaConfig

SETTINGS = ((1, False), (2, False), (4, False), (1, True), (4, True))  # (microbatches, remat)
PROMPTS = 8


def _bench(name: str, repeats: int) -> list[dict]:
    cfg = GemmaConfig(**SIZES[name][0])
    base = reinforce.RLConfig(num_samples=2, max_new_tokens=NEW, learning_rate=1e-6)
    params = nn.unbox(Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rows = PROMPTS * base.num_samples
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.integers(3, cfg.vocab_size, (rows, PROMPT)), jnp.int32),
             jnp.ones((rows, PROMPT), bool),
             jnp.asarray(rng.integers(3, cfg.vocab_size, (rows, NEW)), jnp.int32),
             jnp.ones((rows, NEW), bool))
    reward = jnp.asarray(rng.normal(size=rows), jnp.float32)
    state = reinforce.init_state(params, base)
    out = []
    for microbatches, remat in SETTINGS:
        rl = dataclasses.replace(base, microbatches=microbatches, remat=remat)
        update = functools.partial(reinforce.update, cfg=cfg, rl=rl)
        compiled = jax.jit(update).lower(state, batch, reward, None).compile()
        jax.block_until_ready(compiled(state, batch, reward, None))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch, reward, None))
            times.append(time.perf_counter() - start)
        out.append(dict(config=name, microbatches=microbatches, remat=remat,
                        temp=compiled.memory_analysis().temp_size_in_bytes,
                        seconds=statistics.median(times)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="tiny", help=f"comma list of {sorted(SIZES)}")
    _add_malloc_flag(parser)
    args = parser.parse_args()
    sizes = _sizes(parser, args.sizes, SIZES)
    malloc = _set_malloc(args).removesuffix(", for both")
    print(f"JAX {jax.__version__} ({device_description()}); {PROMPTS * 2} sequences of "
          f"{PROMPT}+{NEW} tokens; median of {args.repeats}; {malloc}; {stamp()}")
    print("\n| config | microbatches | remat | temporary MB | vs plain | update s | vs plain |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in sizes:
        rows = _bench(name, args.repeats)
        plain = rows[0]
        for r in rows:
            print(f"| {name} | {r['microbatches']} | {'yes' if r['remat'] else 'no'} | "
                  f"{r['temp'] / 1e6:.1f} | {r['temp'] / plain['temp']:.2f}x | "
                  f"{r['seconds']:.3f} | {r['seconds'] / plain['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
