"""The reproduction study: the paper's six observations on real review text.

    python -m experiments.reproduce --config=experiments/configs/reproduce.py:VARIANT

Variants: `full` (the study of docs/reproduction.md: 3 seeds, about 45 minutes on 2 CPU
cores) and `smoke` (2 seeds, a few minutes: what the tests run). Any field is overridable,
as in the main job (`--config.study.seeds=5`); the fields of experiments/configs/gemma_warp.py
mean the same here.
"""

import ml_collections

from experiments.configs import gemma_warp


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = gemma_warp.get_config("cpu_demo")
    c.variant = variant

    # Real critics' snippets: the SFT policy learns those of 45% of the movies, the gold
    # classifier is fitted on the fresh/rotten labels of another 35%; RL and evaluation
    # prompts open the snippets of the last two tenths.
    c.task.name = "rotten_tomatoes"
    c.task.vocab_size = 1024
    c.task.num_prompts = 4000  # every RL-part opening (about 1,250)
    c.task.eval_prompts = 64
    c.task.prompt_words = 4
    c.task.prompt_len = 10
    c.model.overrides = ml_collections.ConfigDict(
        {"num_layers": 4, "embed_dim": 128, "mlp_dim": 512, "num_heads": 4, "num_kv_heads": 2,
         "head_dim": 32})  # 1.1M parameters
    c.sft.steps, c.sft.max_len = 600, 48
    c.reward.oracle = "gold"
    c.reward.pairs, c.reward.steps, c.reward.learning_rate = 4096, 150, 1e-3

    # Every field the study depends on is set here, so the main job's defaults can change
    # without changing the study.
    c.reward.normalize, c.reward.norm_samples = True, 512
    c.rl.beta = 0.1  # without a pilot; the pilot's choice otherwise
    c.rl.batch_size, c.rl.num_samples = 16, 2  # prompts per step, completions per prompt
    c.rl.max_new_tokens, c.rl.temperature = 16, 0.9
    c.rl.learning_rate, c.rl.warmup_steps = 2e-4, 10
    c.rl.mu = 0.05  # EMA rate, for runs of 150 steps (the paper: 0.01 over 9k)
    c.warp.iterations, c.warp.runs, c.warp.steps = 3, 4, 150
    c.warp.eta, c.warp.eta_grid = 0.3, (0.0, 0.1, 0.3, 0.5, 0.8, 1.0)
    c.warp.granularity = "layer"
    c.warp.baselines = ("reinforce_sft", "reinforce_ema")
    c.eval.every, c.eval.samples = 50, 8

    c.study = ml_collections.ConfigDict()
    c.study.seeds = ml_collections.FieldReference(3)  # RL seeds: prompt order and sampling
    # keys (SFT and rewards fixed); each baseline runs once per seed
    c.warp.baseline_runs = c.study.get_ref("seeds")
    c.study.pilot_betas = (0.03, 0.1, 0.3, 1.0)  # SFT-anchored pilot runs; () skips the pilot
    c.study.pilot_steps = 150
    c.study.bind = 0.5  # the study's beta: the smallest pilot beta whose KL term (beta x KL)
    # costs at least this fraction of the proxy reward its run gained
    c.study.lambdas = (0.25, 0.5, 0.75)  # SLERP against LERP of two runs
    c.study.levels = (0.25, 0.5, 0.75)  # matched-KL levels, as fractions of the shared range
    c.study.alpha = 0.05  # the one-sided paired test over seeds
    c.study.max_task_cosine = 0.2  # "close to orthogonal": mean |cosine| below this
    c.study.min_weight_cosine = 0.99  # "collinear": mean full-weight cosine above this

    if variant == "full":
        pass
    elif variant == "smoke":
        c.task.vocab_size, c.task.eval_prompts = 256, 16
        c.model.overrides = ml_collections.ConfigDict({"num_layers": 1, "embed_dim": 32,
                                                       "mlp_dim": 64})
        c.sft.steps, c.sft.batch_size, c.sft.max_len = 30, 16, 24
        c.reward.pairs, c.reward.steps, c.reward.norm_samples = 64, 10, 32
        c.rl.batch_size, c.rl.max_new_tokens = 8, 6
        c.warp.iterations, c.warp.runs, c.warp.steps = 2, 3, 4
        c.warp.eta_grid = (0.0, 0.5, 1.0)
        c.eval.every, c.eval.samples = 2, 2
        c.study.seeds, c.study.pilot_betas, c.study.pilot_steps = 2, (0.1, 1.0), 4
    else:
        raise ValueError(f"unknown variant {variant!r}: use full or smoke")
    return c
