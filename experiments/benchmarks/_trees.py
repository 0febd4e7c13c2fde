"""Gemma-2B-like float32 tensors shared by the merge benchmark and its mergekit worker."""

import numpy as np

# Gemma 2B: d 2048, 8 heads of 256 (one KV head), MLP 16384. Two blocks and a
# 16384-row embedding make ~1 GB of float32 per tree.
D, HEADS, HEAD_DIM, MLP, VOCAB, BLOCKS = 2048, 8, 256, 16384, 16384, 2


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"embedder.input_embedding": (VOCAB, D), "final_norm.scale": (D,)}
    for i in range(BLOCKS):
        out |= {
            f"layer_{i}.attn.q": (D, HEADS, HEAD_DIM),
            f"layer_{i}.attn.k": (D, 1, HEAD_DIM),
            f"layer_{i}.attn.v": (D, 1, HEAD_DIM),
            f"layer_{i}.attn.o": (HEADS, HEAD_DIM, D),
            f"layer_{i}.mlp.gate": (D, MLP),
            f"layer_{i}.mlp.up": (D, MLP),
            f"layer_{i}.mlp.down": (MLP, D),
            f"layer_{i}.pre_attention_norm.scale": (D,),
            f"layer_{i}.pre_ffw_norm.scale": (D,),
        }
    return out


def make_trees(seed: int = 0, num_policies: int = 2) -> list[dict[str, np.ndarray]]:
    """Returns `[init, policy_1, ..., policy_M]`: policies are init plus small noise."""
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes().items()}
    trees = [init]
    for _ in range(num_policies):
        trees.append({k: v + 0.01 * rng.standard_normal(v.shape, dtype=np.float32)
                      for k, v in init.items()})
    return trees
