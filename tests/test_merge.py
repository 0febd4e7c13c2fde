"""`python -m warp_jax.merge` against the library functions, its memory bound, bad input."""

import json
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from warp_jax import merge, merging
from warp_jax.checkpoint import Checkpoints
from warp_jax.gemma import hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, sliding_window=4)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    model.save_pretrained(root / "init")
    dirs = []
    for m in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / f"run{m}")
        dirs.append(root / f"run{m}")
        model = transformers.Gemma2ForCausalLM.from_pretrained(root / "init")
    return root, dirs


@pytest.mark.parametrize("num,granularity", [(2, "tensor"), (2, "layer"), (3, "layer"),
                                             (3, "tensor")])
def test_cli_output_equals_the_library(checkpoints, tmp_path, num, granularity, capsys):
    root, runs = checkpoints
    out = tmp_path / "merged"
    weights = "0.2,0.3,0.5" if num == 3 else "0.5,0.5"
    policy_flags = [flag for d in runs[:num] for flag in ("--policy", str(d))]
    merge.main(["--init", str(root / "init"), *policy_flags,
                "--weights", weights, "--granularity", granularity, "--eta-grid", "0.3,1",
                "--out", str(out)])
    assert "| layer_0 |" in capsys.readouterr().out
    cfg = hf.config_from_hf(transformers.AutoConfig.from_pretrained(root / "init"))
    init = hf.params_from_hf(root / "init", cfg)
    policies = [hf.params_from_hf(d, cfg) for d in runs[:num]]
    groups = merging.block_groups(init) if granularity == "layer" else None
    merged = merging.slerp_tree(init, policies, [float(w) for w in weights.split(",")],
                                groups=groups)
    for eta in (0.3, 1.0):
        got = hf.params_from_hf(out / f"eta_{eta:g}", cfg)
        want = merging.liti_tree(init, merged, eta)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, want)
    assert transformers.AutoModelForCausalLM.from_pretrained(out / "eta_0.3") is not None
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report) == {"layer_0", "layer_1", "layer_2"} and (out / "merge_report.png").exists()


def test_peak_memory_stays_near_m_plus_2_groups(tmp_path):
    rng = np.random.default_rng(0)
    layers, shape = 6, (512, 512)  # 1 MiB tensors, 4 per block
    names = [f"model.layers.{i}.mlp.{t}.weight" for i in range(layers)
             for t in ("gate_proj", "up_proj", "down_proj", "extra_proj")]
    for d in ("init", "a", "b"):
        (tmp_path / d).mkdir()
        save_file({n: rng.normal(size=shape).astype(np.float32) for n in names},
                  tmp_path / d / "model.safetensors")
    group_bytes = 4 * 512 * 512 * 4
    model_bytes = layers * group_bytes
    tracemalloc.start()
    merge.merge(tmp_path / "init", [tmp_path / "a", tmp_path / "b"], tmp_path / "out",
                progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bound = (2 + 2) * group_bytes + 4 * 512 * 512 * 4  # + a few tensor-sized temporaries
    assert peak < bound, (peak / 2**20, bound / 2**20)
    assert peak < 3 * model_bytes / 2  # far from loading the three models (3 x model_bytes)


def test_bad_input_is_one_clear_error_and_writes_nothing(checkpoints, tmp_path, capsys):
    root, runs = checkpoints
    base = ["--init", str(root / "init"), "--policy", str(runs[0]), "--policy", str(runs[1])]

    def fails(argv, message):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            merge.main([*base, *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    fails(["--eta", "1.5", "--out", str(tmp_path / "o")], "eta must be in [0, 1], got 1.5")
    fails(["--weights", "0.7,0.7", "--out", str(tmp_path / "o")], "sum to 1.4")
    (tmp_path / "exists").mkdir()
    fails(["--out", str(tmp_path / "exists")], "exists; choose a new --out directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    state = {k: v for k, v in transformers.Gemma2ForCausalLM.from_pretrained(runs[0])
             .state_dict().items() if "layers.2.mlp" not in k and "lm_head" not in k}
    save_file({k: v.numpy() for k, v in state.items()}, broken / "model.safetensors")
    (broken / "config.json").write_text((root / "init" / "config.json").read_text())
    fails(["--policy", str(broken), "--out", str(tmp_path / "o")], "missing tensor(s)")
    other = tmp_path / "other"
    transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=48)).save_pretrained(other)
    fails(["--policy", str(other), "--out", str(tmp_path / "o")], "mismatched architectures")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "exists", "other"]


def test_orbax_checkpoints_merge_like_their_hf_exports(checkpoints, tmp_path):
    root, runs = checkpoints
    cfg = hf.config_from_hf(transformers.AutoConfig.from_pretrained(root / "init"))
    ckpt = Checkpoints(tmp_path / "orbax")
    for m, run in enumerate(runs[:2]):
        ckpt.save(f"run{m}", 5, hf.params_from_hf(run, cfg))
    ckpt.wait()
    ckpt.close()
    flags = ["--init", str(root / "init"), "--eta", "0.3"]
    merge.main([*flags, "--policy", str(runs[0]), "--policy", str(runs[1]),
                "--out", str(tmp_path / "from_hf")])
    merge.main([*flags, "--policy", str(tmp_path / "orbax" / "run0"), "--policy",
                str(tmp_path / "orbax" / "run1" / "5"), "--hf-config", str(root / "init"),
                "--out", str(tmp_path / "from_orbax")])
    want = hf.params_from_hf(tmp_path / "from_hf", cfg)
    got = hf.params_from_hf(tmp_path / "from_orbax", cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    with pytest.raises(SystemExit):
        merge.main([*flags, "--policy", str(tmp_path / "orbax" / "run0"), "--policy",
                    str(runs[1]), "--out", str(tmp_path / "nope")])
    assert not (tmp_path / "nope").exists()


def test_a_stage_checkpoint_of_stacked_runs_merges_like_its_runs(checkpoints, tmp_path):
    root, runs = checkpoints
    cfg = hf.config_from_hf(transformers.AutoConfig.from_pretrained(root / "init"))
    policies = [hf.params_from_hf(run, cfg) for run in runs[:2]]
    ckpt = Checkpoints(tmp_path / "checkpoints")  # as the main job saves a stage's runs
    ckpt.save("iter1", 6, {"params": jax.tree.map(lambda *x: np.stack(x), *policies),
                           "step": np.int32(6)})
    ckpt.close()
    flags = ["--init", str(root / "init"), "--hf-config", str(root / "init"), "--eta", "0.3"]
    merge.main([*flags, "--policy", str(runs[0]), "--policy", str(runs[1]),
                "--out", str(tmp_path / "from_hf")])
    merge.main([*flags, "--policy", str(tmp_path / "checkpoints" / "iter1"),
                "--out", str(tmp_path / "from_stage")])
    merge.main(["--init", str(root / "init"), "--hf-config", str(root / "init"), "--policy",
                str(tmp_path / "checkpoints" / "iter1"), "--run", "1",
                "--out", str(tmp_path / "run1")])
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(close, hf.params_from_hf(tmp_path / "from_stage", cfg),
                 hf.params_from_hf(tmp_path / "from_hf", cfg))
    jax.tree.map(close, hf.params_from_hf(tmp_path / "run1", cfg), policies[1])


def test_damaged_policies_and_colliding_etas_are_refused(checkpoints, tmp_path, capsys):
    root, runs = checkpoints
    nan_run = tmp_path / "nan_run"
    nan_run.mkdir()
    state = transformers.Gemma2ForCausalLM.from_pretrained(runs[1]).state_dict()
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file({k: v.numpy() for k, v in state.items() if k != "lm_head.weight"},
              nan_run / "model.safetensors")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    raw = (runs[1] / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    before = sorted(p.name for p in tmp_path.iterdir())
    base = ["--init", str(root / "init"), "--policy", str(runs[0])]
    capsys.readouterr()
    for flags, message in (
            (["--policy", str(nan_run)], f"error: {nan_run}: tensor "
             "'model.layers.1.mlp.up_proj.weight' has non-finite values (NaN or inf); a "
             "diverged run cannot be merged"),
            (["--policy", str(truncated)], f"error: {truncated / 'model.safetensors'}: not a "
             "readable safetensors file (Error while deserializing header: "),
            (["--policy", str(runs[1]), "--eta-grid", "0.5,0.3,0.5"],
             "error: the etas repeat a value: [0.5, 0.3, 0.5]")):
        with pytest.raises(SystemExit) as info:
            merge.main([*base, *flags, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err  # the error, after the merge's progress bar if any
        assert info.value.code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(message), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    merge.main([*base, "--policy", str(runs[1]), "--eta-grid", "0.1234567,0.1234568,1",
                "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == [
        "eta_0.1234567", "eta_0.1234568", "eta_1"]


def test_two_gemma4_checkpoints_merge_and_load_in_transformers(tmp_path):
    """Gemma 4 with experts and per-layer inputs: the CLI's per-block merge is the library's
    (the per-layer tables outside the blocks, one angle per tensor in the CLI, which groups
    Hugging Face names) and transformers loads the result."""
    config = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        hidden_size_per_layer_input=4, vocab_size_per_layer_input=64, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    transformers.Gemma4ForCausalLM(config).save_pretrained(tmp_path / "init")
    for m in range(2):
        model = transformers.Gemma4ForCausalLM.from_pretrained(tmp_path / "init")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"run{m}")
    merge.main(["--init", str(tmp_path / "init"), "--policy", str(tmp_path / "run0"),
                "--policy", str(tmp_path / "run1"), "--granularity", "layer",
                "--out", str(tmp_path / "merged")])
    cfg = hf.config_from_hf(config)
    init = hf.params_from_hf(tmp_path / "init", cfg)
    groups = merging.block_groups(init)
    groups["per_layer_embedding"] = groups["per_layer_projection"] = None
    want = merging.slerp_tree(init, [hf.params_from_hf(tmp_path / f"run{m}", cfg)
                                     for m in range(2)], groups=groups)
    got = hf.params_from_hf(tmp_path / "merged", cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(loaded).__name__ == "Gemma4ForCausalLM"
    np.testing.assert_array_equal(
        loaded.model.layers[1].experts.down_proj.detach().numpy(),
        hf.params_to_hf(got, cfg)["model.layers.1.experts.down_proj"])


def test_an_empty_eta_grid_settings_that_differ_and_a_killed_merge(checkpoints, tmp_path,
                                                                   capsys):
    root, runs = checkpoints
    base = ["--init", str(root / "init"), "--policy", str(runs[0])]
    with pytest.raises(SystemExit) as info:
        merge.main([*base, "--eta-grid=", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --eta-grid: expected comma-separated numbers, got ''")
    # A policy fine-tuned with another sliding window computes something else: warned.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.safetensors",):
        (other / name).write_bytes((runs[1] / name).read_bytes())
    config = json.loads((runs[1] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "sliding_window": 2}))
    # What a merge killed before it finished left (its process is gone), and a live one's.
    stale = tmp_path / ".o.k1ll3d"
    stale.mkdir()
    (stale / "merge.pid").write_text("999999999")
    live = tmp_path / ".o.l1v3"
    live.mkdir()
    (live / "merge.pid").write_text(str(__import__("os").getpid()))
    merge.main([*base, "--policy", str(other), "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line
           and line.strip()]  # no progress bars
    assert err == [
        f"warning: removed {stale}, the unfinished output of a merge that was stopped",
        f"warning: {other}'s config.json differs from the init's in sliding_window (4 -> 2); "
        "the merge is written with the init's"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.l1v3", "o", "other"]
    assert not (tmp_path / "o" / "merge.pid").exists()
