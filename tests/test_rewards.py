"""The reward model against transformers' sequence-classification Gemmas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from warp_jax import rewards, sharding
from warp_jax.gemma import hf

GEMMA2_EXTRA = dict(sliding_window=3, query_pre_attn_scalar=16, attn_logit_softcapping=3.0)


@pytest.mark.parametrize("name,config_cls,extra", [
    ("GemmaForSequenceClassification", transformers.GemmaConfig, {}),
    ("Gemma2ForSequenceClassification", transformers.Gemma2Config, GEMMA2_EXTRA),
    ("Gemma3TextForSequenceClassification", transformers.Gemma3TextConfig,
     dict(sliding_window=3, query_pre_attn_scalar=16)),
])
def test_scores_match_transformers_with_padding(name, config_cls, extra, tmp_path):
    hf_config = config_cls(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=64, num_labels=1, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, name)._from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    cfg = hf.config_from_hf(model.config)
    params = hf.params_from_hf(model.state_dict(), cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, size=(4, 9)).astype(np.int64)
    mask = np.ones_like(tokens, bool)
    mask[1, :3] = mask[3, :7] = False
    tokens[~mask] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))
                    ).logits[:, 0].numpy()
    ours = jax.jit(rewards.RewardModel(cfg).apply)({"params": params}, jnp.asarray(tokens),
                                                   jnp.asarray(mask))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    back = hf.params_to_hf(params, cfg)
    state = model.state_dict()
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    hf.save_hf(params, cfg, tmp_path)  # what WARP's reward.hf_dir and transformers read
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(saved).__name__ == name and saved.config.num_labels == 1
    with torch.no_grad():
        again = saved(input_ids=torch.from_numpy(tokens),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)),
                      position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))
                      ).logits[:, 0].numpy()
    np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_model_reward_passes_its_params_to_jitted_code_as_arguments():
    """A closure's arrays would be baked into the program as constants: a 7B reward model
    copied into every compiled train step and replicated on every device."""
    from warp_jax import reinforce
    from warp_jax.gemma import GemmaConfig

    cfg = GemmaConfig.from_preset("tiny", vocab_size=16, num_layers=1)
    params = nn.unbox(rewards.RewardModel(cfg).init(
        jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool))["params"])
    reward = rewards.model_reward(cfg, params)
    leaves, treedef = reinforce.reward_arrays(reward)
    assert len(leaves) == len(jax.tree.leaves(params))
    batch = (jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), bool), jnp.full((2, 2), 5),
             jnp.ones((2, 2), bool))
    call = jax.jit(lambda leaves, batch: reinforce.call_reward(None, treedef, leaves, batch))
    np.testing.assert_allclose(call(leaves, batch), reward(*batch), rtol=1e-6)
    weights = 'constant dense<"0x'  # how StableHLO spells a literal array
    assert weights not in call.lower(leaves, batch).as_text()
    assert weights in jax.jit(lambda b: reward(*b)).lower(batch).as_text()  # the closure
    assert reinforce.reward_arrays(lambda *batch: batch[0][:, 0]) == ([], None)


def test_a_standardised_reward_has_mean_0_and_std_1_on_its_reference_and_stays_jittable():
    from warp_jax import reinforce
    from warp_jax.gemma import GemmaConfig

    cfg = GemmaConfig.from_preset("tiny", vocab_size=16, num_layers=1)
    params = nn.unbox(rewards.RewardModel(cfg).init(
        jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool))["params"])
    raw = rewards.model_reward(cfg, params)
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.integers(3, 16, (8, 3))), jnp.ones((8, 3), bool),
             jnp.asarray(rng.integers(3, 16, (8, 2))), jnp.ones((8, 2), bool))
    reward = rewards.standardize(raw, rewards.score(raw, batch))
    scores = rewards.score(reward, batch)
    np.testing.assert_allclose([scores.mean(), scores.std()], [0.0, 1.0], atol=1e-5)
    leaves, treedef = reinforce.reward_arrays(reward)  # its params and statistics: arguments
    assert len(leaves) == len(jax.tree.leaves(params)) + 2
    call = jax.jit(lambda leaves, batch: reinforce.call_reward(None, treedef, leaves, batch))
    np.testing.assert_allclose(call(leaves, batch), scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"standard deviation 0\.0"):
        rewards.standardize(raw, [1.0, 1.0, 1.0])


def test_the_gold_classifier_learns_real_fresh_and_rotten_labels():
    from warp_jax import data

    parts = data.split_by_movie(data.rotten_tomatoes(), {"train": 0.4, "test": 0.1}, seed=0)
    train, test = parts["train"], parts["test"]
    gold = rewards.TextClassifier([s.text for s in train], [s.fresh for s in train])
    accuracy = gold.accuracy([s.text for s in test], [s.fresh for s in test])
    majority = max(np.mean([s.fresh for s in test]), 1 - np.mean([s.fresh for s in test]))
    assert accuracy > majority + 0.05, (accuracy, majority)  # other movies' critics
    scores = gold(["The film is", "The film is"], ["a triumph, moving and beautiful .",
                                                  "a tedious, boring mess ."])
    assert 0 < scores[1] < 0.5 < scores[0] < 1
    with pytest.raises(ValueError, match="both labels"):
        rewards.TextClassifier(["good", "great"], [True, True])


def test_a_multi_label_head_is_rejected():
    cfg = hf.config_from_hf(transformers.GemmaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32))
    model = transformers.GemmaForSequenceClassification(transformers.GemmaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32, num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1"):
        hf.params_from_hf(model.state_dict(), cfg)


def test_bradley_terry_loss_and_gradient_match_the_formula():
    rc, rr = np.array([1.0, -0.5, 2.0]), np.array([0.0, 0.5, 2.5])
    loss, grads = jax.value_and_grad(rewards.bradley_terry_loss, argnums=(0, 1))(
        jnp.asarray(rc), jnp.asarray(rr))
    sig = 1 / (1 + np.exp(-(rc - rr)))
    np.testing.assert_allclose(loss, np.mean(-np.log(sig)), rtol=1e-6)
    np.testing.assert_allclose(grads[0], -(1 - sig) / 3, rtol=1e-5)
    np.testing.assert_allclose(grads[1], (1 - sig) / 3, rtol=1e-5)


def test_soft_labels_are_the_cross_entropy_with_the_preference_probability():
    rc, rr, p = np.array([1.0, -0.5, 2.0]), np.array([0.0, 0.5, 2.5]), np.array([0.9, 0.6, 0.5])
    d = rc - rr
    want = np.mean(-(p * np.log(1 / (1 + np.exp(-d))) + (1 - p) * np.log(1 / (1 + np.exp(d)))))
    got = rewards.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(p))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        rewards.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.ones(3)),
        rewards.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr)), rtol=1e-6)
    # a tie (p = 0.5) is best learned as no margin at all
    grad = jax.grad(rewards.bradley_terry_loss)(jnp.zeros(1), jnp.zeros(1), jnp.full(1, 0.5))
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)


def test_fit_stops_after_patience_evaluations_without_a_better_loss_and_keeps_the_best():
    losses = iter([1.0, 0.5, 0.7, 0.6, 0.4])  # the held-out loss at each evaluation

    def train_step(state, batch):
        return rewards.RMState(state.step + 1, state.params + 1, state.opt_state), {
            "loss": jnp.zeros(())}

    def evaluate(params, batch):
        return {"loss": next(losses), "accuracy": float(params)}

    state = rewards.RMState(jnp.zeros((), jnp.int32), jnp.zeros(()), ())
    seen = []
    best, metrics = rewards.fit(
        train_step, evaluate, state, (np.zeros((8, 2)),), (np.zeros((2, 2)),), steps=50,
        batch_size=4, seed=0, eval_every=10, patience=2,
        on_eval=lambda s, m: seen.append(int(s.step)), progress=False)
    assert seen == [10, 20, 30, 40]  # 0.7 and 0.6 do not beat 0.5: stopped at the second
    assert (int(best.step), metrics) == (20, {"loss": 0.5, "accuracy": 20.0})


def test_malformed_jsonl_lines_are_reported_with_their_line_number(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n'
                    '{"prompt": "a", "chosen": "b"}\n'
                    'not json\n'
                    '{"prompt": "x", "chosen": "y", "rejected": "z"}\n')
    with pytest.raises(ValueError, match=r"prefs\.jsonl, row 3: no field 'rejected' \(fields: "
                                         r"prompt, chosen\)"):
        rewards.read_preferences(path)
    with pytest.warns(UserWarning) as caught:
        pairs = rewards.read_preferences(path, on_error="skip")
    assert [str(w.message).split("prefs.jsonl, ")[1][:6] for w in caught] == ["row 3:",
                                                                             "row 4:"]
    assert pairs == [rewards.Preference("a", "b", "c"), rewards.Preference("x", "y", "z")]


def _linear_preferences(rng, n, vocab=24, length=8):
    """Pairs of random sequences, the one a known bag-of-words linear scorer prefers first."""
    weights = np.linspace(-1, 1, vocab)
    a = rng.integers(3, vocab, size=(4 * n, length))
    b = rng.integers(3, vocab, size=(4 * n, length))
    margin = weights[a].sum(1) - weights[b].sum(1)
    keep = np.flatnonzero(np.abs(margin) > 1.0)[:n]  # clear preferences only
    chosen = np.where(margin[keep, None] > 0, a[keep], b[keep]).astype(np.int32)
    rejected = np.where(margin[keep, None] > 0, b[keep], a[keep]).astype(np.int32)
    mask = np.ones_like(chosen, bool)
    return tuple(jnp.asarray(x) for x in (chosen, mask, rejected, mask))


@pytest.fixture(scope="module")
def rm_setup():
    from warp_jax.gemma import GemmaConfig

    cfg = GemmaConfig.from_preset("tiny", vocab_size=24, num_layers=1, embed_dim=32, mlp_dim=64)
    params = nn.unbox(rewards.RewardModel(cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))["params"])
    return cfg, params


def test_mean_pooling_averages_the_last_token_scores_of_every_prefix(rm_setup):
    """In a causal model, token t's hidden state is the last token's of the prefix ending at
    t: the mean read-out is the mean of the last-token scores of every real prefix."""
    cfg, params = rm_setup
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, 24, (2, 7)), jnp.int32)
    mask = jnp.asarray([[False, False, True, True, True, True, True], [True] * 7])
    mean = rewards.RewardModel(cfg, pooling="mean").apply({"params": params}, tokens, mask)
    last = rewards.RewardModel(cfg)
    for row in range(2):
        prefixes = [last.apply({"params": params}, tokens[row:row + 1, :t + 1],
                               mask[row:row + 1, :t + 1])[0]
                    for t in range(7) if mask[row, t]]
        np.testing.assert_allclose(mean[row], np.mean(prefixes), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling 'max'"):
        rewards.RewardModel(cfg, pooling="max").apply({"params": params}, tokens, mask)


def test_bradley_terry_training_learns_a_linear_scorer(rm_setup):
    cfg, params = rm_setup
    rng = np.random.default_rng(0)
    step, evaluate, init = rewards.make_reward_train_step(cfg, optax.adam(3e-3))
    state = init(params)
    held_out = _linear_preferences(rng, 256)
    before = float(evaluate(state.params, held_out)["accuracy"])
    for _ in range(300):
        state, _ = step(state, _linear_preferences(rng, 32))
    after = evaluate(state.params, held_out)
    assert float(after["accuracy"]) > 0.9, (before, after)
    assert float(after["loss"]) < 0.4


def test_sharded_reward_training_equals_unsharded(rm_setup):
    cfg, params = rm_setup
    rng = np.random.default_rng(1)
    batches = [_linear_preferences(rng, 8) for _ in range(2)]
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    results = []
    for m in (None, mesh):
        step, evaluate, init = rewards.make_reward_train_step(cfg, optax.adam(1e-2), mesh=m)
        state = init(params)
        for batch in batches:
            state, _ = step(state, batch)
        results.append((jax.tree.map(np.asarray, state.params), evaluate(state.params,
                                                                          batches[0])))
    # Adam divides each gradient by its own scale: a near-zero gradient's rounding (a sharded
    # sum adds in another order) moves its weight by up to a fraction of lr = 1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)


def test_sharded_soft_label_training_equals_unsharded(rm_setup):
    cfg, params = rm_setup
    batch = (*_linear_preferences(np.random.default_rng(2), 8),
             jnp.linspace(0.5, 1.0, 8, dtype=jnp.float32))
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    results = []
    for m in (None, mesh):
        step, evaluate, init = rewards.make_reward_train_step(cfg, optax.sgd(1e-2), mesh=m,
                                                              soft_labels=True)
        state, metrics = step(init(params), batch)
        results.append((jax.tree.map(np.asarray, state.params), float(metrics["loss"]),
                        float(evaluate(state.params, batch)["loss"])))
    # one SGD step: the weights move by lr x a float32 gradient summed in another order
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1:], results[1][1:], rtol=1e-5)


def test_a_gemma4_reward_model_scores_with_the_transformers_backbone(tmp_path):
    """transformers has no Gemma 4 sequence classifier: a Gemma 4 reward model is the causal
    LM's tensors plus `score.weight` `[1, D]`. Its scores are transformers' final hidden state
    of each row's last token times that head; `save_hf` writes it so that
    `AutoModelForCausalLM` loads the backbone and `hf.params_from_hf` the whole model."""
    hf_config = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        hidden_size_per_layer_input=4, vocab_size_per_layer_input=64, num_kv_shared_layers=2,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=3)
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM._from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    cfg = hf.config_from_hf(model.config)
    state = dict(model.state_dict(), **{"score.weight": torch.randn(1, 32)})
    params = hf.params_from_hf(state, cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, size=(3, 7)).astype(np.int64)
    mask = np.ones_like(tokens, bool)
    mask[1, :2] = False
    tokens[~mask] = 0
    positions = torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
        hidden = model.model(input_ids=torch.from_numpy(tokens), position_ids=positions,
                             attention_mask=torch.from_numpy(mask.astype(np.int64))
                             ).last_hidden_state[:, -1]
        ref = (hidden @ state["score.weight"][0]).numpy()
    ours = rewards.RewardModel(cfg).apply({"params": params}, jnp.asarray(tokens),
                                          jnp.asarray(mask))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    hf.save_hf(params, cfg, tmp_path)
    jax.tree.map(np.testing.assert_array_equal, hf.params_from_hf(tmp_path, cfg), params)
    backbone = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = backbone.model(input_ids=torch.from_numpy(tokens), position_ids=positions,
                               attention_mask=torch.from_numpy(mask.astype(np.int64))
                               ).last_hidden_state[:, -1]
    np.testing.assert_allclose(again.numpy(), hidden.numpy(), rtol=1e-5, atol=1e-5)
