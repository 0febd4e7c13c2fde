"""Monte-Carlo reward and KL estimates against exact expectations over every completion;
rank correlation and KL-reward fronts against brute force."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

from warp_jax import evaluation, reinforce, sharding
from warp_jax.gemma import Gemma, GemmaConfig, abstract_params

V, N, T = 4, 2, 0.9  # vocabulary, completion length, temperature: V**N completions


def _params(cfg, seed, scale=4.0):
    params = nn.unbox(Gemma(cfg).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))[
        "params"])
    return jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)  # peaked policies


def _reward(prompt_tokens, prompt_mask, completion, completion_mask):
    return jnp.sum(completion * completion_mask, axis=1).astype(jnp.float32)


def test_estimates_match_exact_expectations_over_every_completion():
    cfg = GemmaConfig.from_preset("tiny", vocab_size=V, num_layers=1)
    policy, sft = _params(cfg, 0), _params(cfg, 1)
    prompt = (jnp.array([[2, 3, 1]], jnp.int32), jnp.array([[False, True, True]]))
    samples = 4000
    result = evaluation.evaluate_policy(policy, sft, cfg, prompt, jax.random.key(0),
                                        {"reward": _reward}, max_new_tokens=N, temperature=T,
                                        num_samples=samples)

    every = jnp.array(list(itertools.product(range(V), repeat=N)), jnp.int32)
    rows = (jnp.repeat(prompt[0], len(every), 0), jnp.repeat(prompt[1], len(every), 0),
            every, jnp.ones_like(every, bool))
    logp, logq = (np.asarray(reinforce.sequence_logprob(
        reinforce.completion_logprobs(cfg, p, *rows, T)[0], rows[3]), np.float64)
        for p in (policy, sft))
    prob = np.exp(logp)
    assert abs(prob.sum() - 1) < 1e-5
    exact_kl = np.sum(prob * (logp - logq))
    exact_reward = np.sum(prob * np.asarray(_reward(*rows)))
    assert exact_kl > 0.1  # the two policies differ
    assert abs(result["kl"] - exact_kl) < 4 * result["kl_se"], (result["kl"], exact_kl)
    assert abs(result["reward"] - exact_reward) < 4 * result["reward_se"]
    assert result["completions"][0].shape == (samples, N)


def test_a_policy_is_at_zero_kl_from_itself_in_bfloat16_too():
    """Both log-probs come from the same forward pass: with the sampler's own, rounding that
    raised a token's log-prob also made it likelier to be drawn, biasing the KL upwards."""
    cfg = GemmaConfig.from_preset("tiny", vocab_size=512, embed_dim=128, num_layers=4,
                                  mlp_dim=512, dtype="bfloat16")
    params = _params(cfg, 0, scale=3.0)
    prompts = (jax.random.randint(jax.random.key(2), (4, 8), 3, 512), jnp.ones((4, 8), bool))
    result = evaluation.evaluate_policy(params, params, cfg, prompts, jax.random.key(1),
                                        {"reward": _reward}, max_new_tokens=64,
                                        num_samples=4)
    assert result["kl"] == 0.0 and result["kl_se"] == 0.0


def test_on_a_mesh_each_device_samples_its_rows_with_the_same_result(sampler_backend):
    cfg = GemmaConfig.from_preset("tiny", vocab_size=64, num_layers=2)
    policy, sft = _params(cfg, 0, scale=2.0), _params(cfg, 1, scale=2.0)
    prompts = (np.asarray(jax.random.randint(jax.random.key(3), (8, 5), 3, 64), np.int32),
               np.ones((8, 5), bool))
    kwargs = dict(max_new_tokens=6, temperature=T, num_samples=2, backend=sampler_backend)
    want = evaluation.evaluate_policy(policy, sft, cfg, prompts, jax.random.key(4),
                                      {"reward": _reward}, **kwargs)
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    assert evaluation.prompt_sharding(mesh, 8).spec == PartitionSpec(("data", "fsdp"), None)
    assert evaluation.prompt_sharding(mesh, 6) is None  # 4 batch devices: replicated
    shardings = sharding.param_shardings(abstract_params(cfg), mesh)
    placed = jax.device_put((policy, sft), (shardings, shardings))
    got = evaluation.evaluate_policy(*placed, cfg, prompts, jax.random.key(4),
                                     {"reward": _reward}, mesh=mesh, **kwargs)
    np.testing.assert_array_equal(got["completions"][0], want["completions"][0])
    for key in ("kl", "reward"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_rank_correlation_is_the_correlation_of_the_ranks():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    ranks = [np.argsort(np.argsort(x)) for x in (a, b + a)]
    assert evaluation.rank_correlation(a, b + a) == pytest.approx(
        np.corrcoef(*ranks)[0, 1])
    assert evaluation.rank_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert np.isnan(evaluation.rank_correlation(a, np.ones(50)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(-5, 5)), min_size=1, max_size=12))
def test_the_upper_front_is_what_no_point_dominates(points):
    front = evaluation.upper_front(points)
    assert set(front) <= set(points)
    for kl, reward in front:  # brute force: nothing at lower or equal KL does better
        assert all(r <= reward for k, r in points if k <= kl)
    for kl, reward in points:  # and every point has a front point at least as good
        assert any(k <= kl and r >= reward for k, r in front)
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(front))


def test_fronts_are_read_in_log_kl_and_compared_at_fixed_kl_levels():
    a = [(0.0, 0.0), (1.0, 1.0), (4.0, 2.0), (1.5, 0.2)]  # (1.5, 0.2) is dominated
    # linear in KL from the origin, in log KL between positive KLs (2 is log-midway 1 to 4)
    np.testing.assert_allclose(evaluation.front_at(a, [0.5, 2.0, 4.0]), [0.5, 1.5, 2.0])
    assert np.isnan(evaluation.front_at(a, [5.0])).all()
    np.testing.assert_allclose(evaluation.front_at(a, [5.0, 8.0], extend=True), [2.0, 2.0])
    b = [(k, r - 0.3) for k, r in a] + [(16.0, 9.0)]  # b reaches further, and that counts
    assert evaluation.gap_at(a, b, [2.0, 8.0]) == pytest.approx(
        np.mean([0.3, 2.0 - (1.7 + 9.0) / 2]))
    assert evaluation.gap_at(a, b, [2.0, 8.0], within_both=True) == pytest.approx(0.3)
    assert np.isnan(evaluation.gap_at(a, b, [8.0], within_both=True))
    assert evaluation.matched_gap(a, b, (0.25, 0.5, 0.75)) == pytest.approx(0.3)
    assert evaluation.above(a, [(0.5, 0.1), (2.0, 1.0), (5.0, 0.0)]) == pytest.approx(
        np.mean([0.4, 0.5]))
    assert np.isnan(evaluation.above(a, [(5.0, 0.0)]))


def test_standard_errors_count_a_prompts_samples_as_one_draw():
    rng = np.random.default_rng(0)
    per_prompt = rng.normal(size=16)
    assert evaluation.mean_se(per_prompt) == pytest.approx(
        (per_prompt.mean(), per_prompt.std(ddof=1) / 4))
    # eight identical samples of each prompt carry one prompt's information, not eight
    assert evaluation.mean_se(np.repeat(per_prompt, 8), 8) == pytest.approx(
        evaluation.mean_se(per_prompt))
    assert evaluation.mean_se(np.repeat(per_prompt, 8))[1] < evaluation.mean_se(per_prompt)[1]
