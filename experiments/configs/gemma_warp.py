"""WARP on Gemma.

    python -m experiments.gemma_warp --config=experiments/configs/gemma_warp.py:VARIANT


Variants: `cpu_demo` (default; self-contained, about 2 minutes on 2 CPU cores), `test` (the
seconds-long version the tests run), `gemma_2b`, `gemma_7b_paper`, `gemma4_e4b` and
`gemma4_26b_a4b` (the paper's hyper-parameters; they need `--config.model.hf_dir`,
`--config.model.tokenizer`, `--config.task.prompts` and `--config.reward.hf_dir`;
`--config.task.chat=True` for an instruction-tuned checkpoint).
"""

import ml_collections


def get_config(variant: str = "cpu_demo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0  # every key and data order derives from it
    c.plan_first = False  # on a TPU: compile every program first, stop in a minute if it won't fit

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # GemmaConfig preset: the built-in task's policy; what plans use
    # without model.hf_dir
    c.model.overrides = ml_collections.ConfigDict({"num_layers": 2, "embed_dim": 64,
                                                   "mlp_dim": 128})  # preset field overrides
    c.model.hf_dir = ""  # a local Hugging Face Gemma checkpoint: the SFT policy
    c.model.tokenizer = ""  # its SentencePiece tokenizer.model
    c.model.dtype = "float32"  # compute dtype; the policy's weights and Adam state stay float32
    c.model.scan_layers = False  # blocks under one lax.scan: compile time flat in depth (TPU)

    c.task = ml_collections.ConfigDict()
    c.task.name = "reviews"  # built-in: "reviews" (a grammar) or "rotten_tomatoes" (real
    # critics' snippets, data.rotten_tomatoes); or "prompts" (c.task.prompts)
    # task "prompts": a local text (one a line), jsonl, json, parquet or csv file, a directory
    # of shards or a datasets.save_to_disk directory; strings or conversations (TRL's format)
    c.task.prompts = ""
    c.task.prompt_column = "prompt"  # the column that holds the prompts
    c.task.split = ""  # the split of a saved DatasetDict or of Hub-named shards ("train")
    c.task.long_prompts = "truncate"  # longer than prompt_len: "truncate" (keep BOS and the
    # end) or "refuse"
    c.task.corpus_size = 4000  # built-in reviews the tokenizer and SFT policy learn from
    c.task.vocab_size = 160  # SentencePiece vocabulary of the built-in task
    c.task.num_prompts = 512  # built-in training prompts (at most)
    c.task.eval_prompts = 64  # held-out prompts for evaluation
    c.task.prompt_len = 8  # prompts are left-padded/truncated to this many tokens
    c.task.prompt_words = 4  # rotten_tomatoes: a prompt is a snippet's first words
    c.task.movie_split = (0.45, 0.35, 0.1, 0.1)  # rotten_tomatoes: shares of the movies for
    # SFT text, the gold classifier, RL prompts and evaluation prompts (no movie in two)
    c.task.chat = False  # render plain prompts as a user turn with the checkpoint's chat
    # template (-it models); conversations always are; completions end where a turn ends

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 400  # built-in task: SFT pre-training steps
    c.sft.batch_size = 64
    c.sft.learning_rate = 3e-3
    c.sft.max_len = 32  # tokens of a training text

    c.reward = ml_collections.ConfigDict()
    c.reward.hf_dir = ""  # a *ForSequenceClassification checkpoint (num_labels=1)
    c.reward.oracle = "vader"  # built-in tasks' oracle, which labels the proxy's pairs and
    # scores every evaluation: "vader", "gold" (a classifier of the real fresh/rotten labels,
    # task rotten_tomatoes) or "" (none)
    c.reward.pairs = 2048  # built-in: SFT completion pairs the oracle labels
    c.reward.pair_temperature = 1.0  # built-in: their sampling temperature
    c.reward.labels = "hard"  # built-in: "hard" (the oracle's ranking, ties dropped) or
    # "soft" (P(chosen preferred) = sigmoid of the gold logits' difference; oracle "gold")
    c.reward.pooling = "last"  # built-in: the reward model's read-out, "last" (the HF
    # sequence classifier's last token) or "mean" (every real token's score averaged)
    c.reward.steps = 300  # built-in: Bradley-Terry steps
    c.reward.batch_size = 64
    c.reward.learning_rate = 3e-3
    c.reward.warmup_steps = 0  # built-in: linear warm-up, then cosine decay to 0 when > 0
    c.reward.eval_every = 0  # built-in: held-out evaluations (a curve in reward_model.json)
    c.reward.patience = 0  # built-in: stop after this many evaluations without a better
    # held-out loss, keeping the best (0: never)
    # built-in: a proxy at or below chance on >= 20 held-out pairs stops the job unless True
    c.reward.allow_chance = False
    c.reward.normalize = True  # proxy standardised on SFT samples: beta means the same at
    # any reward-model scale
    c.reward.norm_samples = 512  # SFT completions that standardisation measures

    c.rl = ml_collections.ConfigDict()
    c.rl.beta = 0.3  # KL coefficient (paper: 0.1). On the standardised built-in proxy, 0.3
    # binds: the SFT-anchored run plateaus at KL ~1.3 by step 75 (at 0.1 it gains to step 175)
    c.rl.mu = 0.05  # EMA rate (paper: 0.01 over 9k steps; faster for our 100-step runs)
    c.rl.num_samples = 2  # K completions per prompt (RLOO)
    c.rl.baseline = "rloo"
    c.rl.batch_size = 16  # prompts per step
    c.rl.max_new_tokens = 12
    c.rl.stop_pieces = ()  # pieces that end a completion besides eos ("<end_of_turn>" for -it)
    c.rl.temperature = 0.9  # paper: 0.9
    c.rl.learning_rate = 3e-4
    c.rl.warmup_steps = 10
    c.rl.grad_clip = 1.0  # global-norm clipping; 0 disables it
    c.rl.adam_eps = 1e-8
    c.rl.microbatches = 1  # the update's gradient summed over this many slices of the prompts
    c.rl.remat = False  # recompute each block's activations in the backward pass
    c.rl.sampler_backend = "auto"  # "xla", "cpu" (opt-in) or "auto": cpu where JAX runs on CPU
    # Where a run samples: "auto" (its devices as tensor x data parallel, no FSDP: the weights
    # moved once per rollout, not gathered per token), a tensor-parallel degree, or "train"
    c.rl.decode_layout = "auto"

    c.warp = ml_collections.ConfigDict()
    c.warp.iterations = 2  # I
    c.warp.runs = 2  # M
    c.warp.steps = 100  # T, per run and iteration
    c.warp.eta = 0.3  # LITI towards the iteration's init gives the next init (paper: 0.3)
    c.warp.eta_grid = (0.0, 0.1, 0.3, 0.5, 0.8, 1.0)  # the final front
    c.warp.granularity = "layer"  # SLERP angle per transformer block, or "tensor"
    c.warp.baselines = ("reinforce_sft", "reinforce_ema", "lerp")  # compared methods
    c.warp.baseline_runs = 2  # seeds of each REINFORCE baseline (stacked): the verdict's
    # standard error
    c.warp.export_eta = 1.0  # the point of the final front saved in HF format

    c.mesh = ml_collections.ConfigDict()  # how each run's devices split (warp.runs: `run`)
    c.mesh.data = 0  # data-parallel devices (0: what fsdp and model leave)
    c.mesh.fsdp = 0  # devices sharding weights and batch (0: what data and model leave)
    c.mesh.model = 1  # tensor-parallel devices (heads, MLP, vocabulary)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 25  # RL steps between evaluations (and checkpoints)
    c.eval.samples = 8  # completions per held-out prompt

    if variant == "cpu_demo":
        pass
    elif variant == "test":
        c.task.corpus_size, c.task.num_prompts, c.task.eval_prompts = 600, 64, 8
        c.sft.steps, c.reward.pairs, c.reward.steps = 60, 128, 40
        c.reward.norm_samples = 64
        c.rl.batch_size, c.rl.max_new_tokens = 8, 6
        c.warp.steps, c.eval.every, c.eval.samples = 6, 3, 2
        c.warp.eta_grid = (0.0, 0.5, 1.0)
    elif variant in ("gemma_2b", "gemma_7b_paper", "gemma4_e4b", "gemma4_26b_a4b"):
        c.task.name = "prompts"
        c.model.preset = {"gemma_7b_paper": "gemma_7b"}.get(variant, variant)
        c.model.overrides = ml_collections.ConfigDict()
        c.model.dtype = "bfloat16"
        c.model.scan_layers = True  # Gemma 4: one period of its pattern a step
        c.task.prompt_len = 256
        c.reward.oracle = ""
        c.reward.normalize = False  # the paper does not say
        c.rl.update(dict(beta=0.1, mu=0.01, batch_size=128 // c.rl.num_samples,
                         max_new_tokens=320, learning_rate=1e-6, warmup_steps=100, grad_clip=0.0,
                         remat=True))  # 128 sequences of 576 tokens: activations dominate
        c.warp.steps = 2000 if variant == "gemma_2b" else 9000
        c.warp.iterations = 2 if variant == "gemma_2b" else 5
        c.eval.every, c.eval.samples = 100, 2
        c.warp.baseline_runs = 1
        c.mesh.data = 1  # every device of a run shards the weights (FSDP)
        c.plan_first = True
    else:
        raise ValueError(f"unknown variant {variant!r}: use cpu_demo, test, gemma_2b, "
                         "gemma_7b_paper, gemma4_e4b or gemma4_26b_a4b")
    return c
