"""The WARP loop end to end: outputs, merges, kill-and-resume, bad configs (slow)."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers

from experiments.configs.gemma_warp import get_config
from warp_jax import data, ingredients, merging, settings, warp
from warp_jax.checkpoint import read_tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT}/experiments/configs/gemma_warp.py:test"
pytestmark = pytest.mark.slow


def _main(workdir, *flags):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "experiments.gemma_warp",
                             f"--config={CONFIG}", f"--workdir={workdir}", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("warp")
    return workdir, warp.run(get_config("test"), workdir)


def test_end_to_end_on_the_8_device_mesh_writes_every_output(finished):
    workdir, result = finished
    assert len(jax.devices()) == 8
    config = get_config("test")
    for name in ("pareto_front.json", "pareto_front.png", "summary.md", "metrics.jsonl",
                 "final_policy/model.safetensors", "final_policy/config.json"):
        assert (workdir / name).exists(), name
    assert list((workdir / "tensorboard").iterdir())
    records = json.loads((workdir / "pareto_front.json").read_text())
    methods = {r["method"] for r in records}
    assert methods == {"reinforce_sft", "reinforce_ema", "warp_run", "warp", "lerp"}
    assert {r["run"] for r in records if r["method"] == "warp_run"} == {0, 1}
    assert [eta for eta, _, _ in result.front] == list(config.warp.eta_grid)
    for r in records:
        assert np.isfinite([r["kl"], r["kl_se"], r["proxy_reward"], r["oracle_reward"]]).all()
    assert len(result.inits) == config.warp.iterations + 1
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "final_policy")
    assert model.config.vocab_size == result.inits[0]["input_embedding"].shape[0]
    summary = (workdir / "summary.md").read_text()
    assert "Verdict" in summary and not re.search(r"\bnan\b", summary)
    verdicts = [line for line in summary.splitlines() if "WARP's front minus" in line]
    assert len(verdicts) == 4 and all(  # 2 rewards x 2 baselines: a number, or why none
        "standard error over 2 runs" in line or "share no KL range" in line
        for line in verdicts), verdicts
    assert "docs/reproduction.md" in summary


def test_merged_policy_is_slerp_of_the_saved_runs_and_liti_gives_the_next_init(finished):
    workdir, result = finished
    for i, merged in enumerate(result.merged, start=1):
        init = jax.device_get(result.inits[i - 1])
        saved = read_tree(workdir / "checkpoints" / f"iter{i}")["params"]  # the runs' states
        policies = [jax.tree.map(lambda x, m=m: np.asarray(x[m]), saved) for m in range(2)]
        want = merging.slerp_tree(init, policies, groups=merging.block_groups(init))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     jax.device_get(merged), want)
        next_init = merging.liti_tree(init, jax.device_get(merged), 0.3)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     jax.device_get(result.inits[i]), next_init)


def test_killed_then_resumed_gives_the_same_front(finished, tmp_path):
    reference = json.loads((finished[0] / "pareto_front.json").read_text())
    proc = _main(tmp_path)
    deadline = time.time() + 300
    while not (tmp_path / "records" / "iter1.json").exists():  # mid-run: inside iteration 1
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "pareto_front.json").exists()
    proc = _main(tmp_path)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "pareto_front.json").read_text()) == reference
    assert _logged_steps(tmp_path) == _logged_steps(finished[0])  # each step once


def _logged_steps(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return sorted((r["stage"], r["run"], r["step"]) for r in map(json.loads, lines))


def test_a_damaged_workdir_resumes_to_the_same_front(finished, tmp_path, capsys):
    reference, workdir = finished[0], tmp_path / "w"
    shutil.copytree(reference, workdir)
    for name in ("pareto_front.json", "summary.md"):
        (workdir / name).unlink()
    data = max((workdir / "checkpoints" / "iter1" / "6").rglob("d/*"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:][:64])
    data.write_bytes(bytes(raw))  # 64 flipped bytes in the latest step of iteration 1's runs
    (workdir / "records" / "iter2.json").unlink()  # iteration 2 lost its evaluations
    capsys.readouterr()
    warp.run(get_config("test"), workdir)
    err = capsys.readouterr().err
    assert f"warning: {workdir / 'checkpoints' / 'iter1' / '6'}: checksum mismatch" in err
    assert f"warning: {workdir / 'records' / 'iter2.json'} lacks evaluations" in err
    assert (json.loads((workdir / "pareto_front.json").read_text())
            == json.loads((reference / "pareto_front.json").read_text()))
    assert _logged_steps(workdir) == _logged_steps(reference)
    changed = get_config("test")
    changed.rl.beta = 0.5
    before = (workdir / "pareto_front.json").read_bytes()
    with pytest.raises(ValueError, match=r"was made with another config: rl.beta \(0.3 -> 0.5\)"):
        warp.run(changed, workdir)
    assert (workdir / "pareto_front.json").read_bytes() == before


def test_a_bad_config_value_is_one_clear_line_and_leaves_the_workdir_intact(tmp_path):
    (tmp_path / "keep.txt").write_text("results from before")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _main(tmp_path, "--config.warp.eta=1.5")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == ("error: config.warp.eta = 1.5: must be in [0, 1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    proc = _main(tmp_path, "--config.warp.granularity=block")
    _, err = proc.communicate(timeout=300)
    assert "config.warp.granularity = 'block': use 'layer' or 'tensor'" in err
    proc = _main(tmp_path, "--config.rl.betaa=0.2")  # a typo in an override
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        "error: 'betaa' Did you mean \"beta\" instead of \"betaa\"?"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    proc = _main(tmp_path, "--num_processes=2")  # no cluster to detect, no coordinator
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        "error: --distributed: coordinator_address should be defined. (give "
        "--coordinator_address, --num_processes and --process_id)")
    bad = get_config("test")
    bad.model.hf_dir = str(tmp_path)  # the built-in task would silently not read it
    with pytest.raises(ValueError, match=r"config.model.hf_dir = '.*': is read by task 'prompts' "
                                         r"only \(add --config.task.name=prompts"):
        warp.run(bad, tmp_path)
    bad.model.hf_dir = ""
    bad.task.chat = True  # the built-in task has no chat turns
    with pytest.raises(ValueError, match=r"config.task.chat = True: applies to task 'prompts'"):
        warp.run(bad, tmp_path)
    bad.task.chat = False
    bad.rl.stop_pieces = (107,)  # an id, not a piece
    with pytest.raises(ValueError, match=r"config.rl.stop_pieces = \(107,\): needs a tuple of"):
        warp.run(bad, tmp_path)
    bad.rl.stop_pieces = ("<end_of_turn>",)  # valid, but not in the built-in vocabulary
    with pytest.raises(ValueError, match=r"stop_pieces = \('<end_of_turn>',\): '<end_of_turn>' "
                                         r"is not a piece"):
        warp.run(bad, tmp_path / "new")
    bad.rl.stop_pieces = ()
    bad.rl.microbatches = 3  # 8 prompts a step
    with pytest.raises(ValueError, match=r"config.rl.microbatches = 3: must divide "
                                         r"rl.batch_size \(8 prompts\)"):
        warp.run(bad, tmp_path)
    bad.rl.microbatches = 1
    bad.mesh.model = 3  # 8 devices, 2 runs: 4 devices each
    with pytest.raises(ValueError, match=r"config.mesh.model = 3: must divide the 4 device"):
        warp.run(bad, tmp_path)
    bad.mesh.model, bad.mesh.fsdp, bad.rl.batch_size = 1, 2, 6  # over data x fsdp = 2 x 2
    with pytest.raises(ValueError, match=r"config.rl.batch_size = 6: must be a multiple of mesh "
                                         r"data x fsdp = 2 x 2"):
        warp.run(bad, tmp_path)


@pytest.mark.parametrize("devices, flags, want", [
    (8, {}, dict(run=2, data=4, fsdp=1, model=1)),  # the test variant: batch 8
    (8, {"mesh.model": 2}, dict(run=2, data=2, fsdp=1, model=2)),
    (8, {"mesh.fsdp": 4}, dict(run=2, data=1, fsdp=4, model=1)),
    (8, {"warp.runs": 3}, dict(run=1, data=8, fsdp=1, model=1)),  # runs take turns
    (32, {"rl.batch_size": 32}, dict(run=2, data=16, fsdp=1, model=1)),
    (32, {"mesh.data": 2, "mesh.model": 2}, dict(run=2, data=2, fsdp=4, model=2)),
    (1, {}, dict(run=1, data=1, fsdp=1, model=1)),
])
def test_mesh_shape_splits_each_runs_devices(devices, flags, want):
    config = get_config("test")
    for field, value in flags.items():
        section, key = field.split(".")
        config[section][key] = value
    assert settings.mesh_shape(config, devices) == want


@pytest.fixture(scope="module")
def local_variant(tmp_path_factory):
    """The gemma_2b path (local policy, tokenizer, prompts and reward model) at toy size: the
    files, and the config overrides (section.field: value) that point at them."""
    from warp_jax.gemma.tokenizer import Tokenizer

    tmp_path = tmp_path_factory.mktemp("local")
    texts = [f"the {a} was {b}" for a in ("film", "plot", "cast") for b in ("good", "bad")]
    Tokenizer.train(texts * 20, vocab_size=24).save(tmp_path / "plain.model")
    tokenizer = Tokenizer.train(texts * 20, vocab_size=26, special_pieces=data.CHAT_PIECES)
    tokenizer.save(tmp_path / "tokenizer.model")
    small = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 intermediate_size=64, sliding_window=4)
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small)).save_pretrained(
        tmp_path / "policy")
    transformers.Gemma2ForSequenceClassification(transformers.Gemma2Config(
        **small, num_labels=1, pad_token_id=0)).save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.txt").write_text("\n".join(texts * 4))
    overrides = {
        "model.hf_dir": str(tmp_path / "policy"),
        "model.tokenizer": str(tmp_path / "tokenizer.model"),
        "task.prompts": str(tmp_path / "prompts.txt"), "reward.hf_dir": str(tmp_path / "rm"),
        "model.dtype": "float32", "task.prompt_len": 6, "task.eval_prompts": 4,
        "rl.batch_size": 4, "rl.max_new_tokens": 4, "rl.learning_rate": 1e-2,
        "rl.stop_pieces": ("as",),  # ends a completion, besides eos and <end_of_turn>
        "task.chat": True,  # an instruction-tuned policy: prompts in chat turns
        "warp.iterations": 1, "warp.steps": 2, "warp.eta_grid": (0.0, 1.0),
        "warp.baselines": ("reinforce_sft",), "eval.every": 2}
    return tmp_path, tokenizer, texts, overrides


def _local_config(overrides):
    config = get_config("gemma_2b")
    for field, value in overrides.items():
        section, key = field.split(".")
        config[section][key] = value
    return config


def test_the_local_variant_reads_datasets_and_the_checkpoints_chat_template(local_variant,
                                                                           tmp_path):
    """Prompts as a conversational parquet file and a plain save_to_disk dataset; the
    policy's directory carries its tokenizer files with a chat template (Gemma 3's layout,
    written here), which renders them; completions end at the turn's end."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, tokenizer, texts, overrides = local_variant
    policy = tmp_path / "policy"
    shutil.copytree(root / "policy", policy)
    shutil.copy(root / "tokenizer.model", policy / "tokenizer.model")
    template = ("{{ bos_token }}{%- for m in messages -%}{{ '<start_of_turn>' + ('model' if "
                "m['role'] == 'assistant' else m['role']) + '\n' + m['content'] | trim + "
                "'<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
                "{{ '<start_of_turn>model\n' }}{%- endif -%}")
    (policy / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": template}))
    turns = [{"role": "user", "content": t} for t in texts * 4]
    pq.write_table(pa.Table.from_pylist([{"messages": [t]} for t in turns]),
                   tmp_path / "chat.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"prompt": t} for t in texts * 4])}).save_to_disk(str(tmp_path / "plain"))
    config = _local_config({**overrides, "model.hf_dir": str(policy), "task.chat": False,
                            "task.prompts": str(tmp_path / "chat.parquet"),
                            "task.prompt_column": "messages"})
    prepared = ingredients.prepare(config, tmp_path)
    assert prepared.eval_texts[0] == f"<start_of_turn>user\n{(texts * 4)[-4]}<end_of_turn>\n" \
        "<start_of_turn>model\n"
    assert prepared.end_ids == (tokenizer.eos_id, *tokenizer.piece_ids(["as", "<end_of_turn>"]))
    config.task.prompts, config.task.prompt_column = str(tmp_path / "plain"), "prompt"
    config.task.split = "train"
    prepared = ingredients.prepare(config, tmp_path)
    assert prepared.eval_texts == (texts * 4)[-4:]
    assert prepared.end_ids == (tokenizer.eos_id, *tokenizer.piece_ids(["as"]))
    config.task.long_prompts = "refuse"
    with pytest.raises(ValueError, match=r"config.task.prompts: prompt 1 of .* takes \d+ "
                                         r"tokens, more than task.prompt_len = 6"):
        ingredients.prepare(config, tmp_path)


@pytest.fixture(scope="module")
def local_run(local_variant):
    tmp_path, _, _, overrides = local_variant
    return tmp_path / "out", warp.run(_local_config(overrides), tmp_path / "out")


def test_local_checkpoint_variant_runs_on_hf_files(local_variant, local_run):
    tmp_path, tokenizer, texts, overrides = local_variant
    config = _local_config(overrides)
    assert settings.mesh_shape(config, 8) == dict(run=2, data=1, fsdp=4, model=1)  # FSDP per run
    prepared = ingredients.prepare(config, tmp_path)
    assert prepared.end_ids == (tokenizer.eos_id, *tokenizer.piece_ids(["as", "<end_of_turn>"]))
    assert prepared.eval_texts[0] == data.chat_prompt((texts * 4)[-4])  # the held-out 4
    config.model.tokenizer = str(tmp_path / "plain.model")
    with pytest.raises(ValueError, match=r"config.task.chat = True: '<start_of_turn>' is not"):
        ingredients.prepare(config, tmp_path)
    out, result = local_run
    assert [eta for eta, _, _ in result.front] == [0.0, 1.0]
    records = json.loads((out / "pareto_front.json").read_text())
    assert {r["method"] for r in records} == {"reinforce_sft", "warp_run", "warp"}
    assert all(r["oracle_reward"] is None for r in records)
    assert (out / "final_policy" / "model.safetensors").exists()


def _two_processes(workdir, variant, overrides):
    """The main job as two processes of 4 CPU devices each: a 2-host pod slice in miniature,
    each process holding one run's slice of the mesh."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    flags = [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    logs = workdir.parent / f"{workdir.name}_logs"
    logs.mkdir()
    procs = []
    for i in range(2):  # to files: a full pipe would stall a process, and with it the other
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "experiments.gemma_warp",
                 f"--config={ROOT}/experiments/configs/gemma_warp.py:{variant}", *flags,
                 f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                 "--num_processes=2", f"--process_id={i}"],
                cwd=ROOT, env=env, stdout=out, stderr=err, text=True))
    for i, p in enumerate(procs):
        assert p.wait(timeout=900) == 0, (logs / f"{i}.err").read_text()[-3000:]
    outs = [(logs / f"{i}.out").read_text() for i in range(2)]
    assert "final front" in outs[0] and "final front" not in outs[1]  # process 0 reports


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(local_variant, local_run, tmp_path):
    """The local-checkpoint path in two processes gives one 8-device process's outputs."""
    _two_processes(tmp_path / "out", "gemma_2b", local_variant[3])
    tmp_path = tmp_path / "out"
    reference, _ = local_run

    def close(a, b):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert np.isclose(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True), (
                    k, a[k], b[k])
            else:
                assert a[k] == b[k], (k, a[k], b[k])

    for name in ("pareto_front.json", "records/iter1.json"):
        got, want = (json.loads((d / name).read_text()) for d in (tmp_path, reference))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            close(a, b)
    got, want = _metrics(tmp_path), _metrics(reference)
    assert len(got) == len(want) == 6  # written once: 2 baseline steps, 2 steps x 2 runs
    for a, b in zip(got, want, strict=True):
        close(a, b)
    policy = [transformers.AutoModelForCausalLM.from_pretrained(d / "final_policy").state_dict()
              for d in (tmp_path, reference)]
    for name, tensor in policy[1].items():
        np.testing.assert_allclose(policy[0][name].numpy(), tensor.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


def test_the_demo_runs_in_two_processes(tmp_path):
    """The built-in task in two processes: its tokenizer, SFT policy and reward model are made
    alike in both and checkpointed once; every output is written once, by process 0."""
    overrides = {"sft.steps": 20, "reward.steps": 10, "warp.iterations": 1, "warp.steps": 3,
                 "warp.baselines": ("reinforce_sft", "lerp")}
    tmp_path = tmp_path / "out"
    _two_processes(tmp_path, "test", overrides)
    for name in ("pareto_front.json", "pareto_front.png", "summary.md", "tokenizer.model",
                 "final_policy/model.safetensors", "records/iter1_geometry.json"):
        assert (tmp_path / name).exists(), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "baseline_reinforce_sft", "iter1", "reward_model", "sft"]
    assert len(_metrics(tmp_path)) == 3 * 2 + 3 * 2  # two baseline seeds, two WARP runs
    records = json.loads((tmp_path / "pareto_front.json").read_text())
    assert {r["method"] for r in records} == {"reinforce_sft", "warp_run", "warp", "lerp"}
    for r in records:
        assert np.isfinite([r["kl"], r["proxy_reward"], r["oracle_reward"]]).all()
