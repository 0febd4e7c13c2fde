"""Prompts and preference pairs from every local format, plain and conversational, rendered
with chat templates the test writes, against transformers' tokenizer; bad rows named."""

import io
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import transformers

from experiments import train_reward_model
from warp_jax import data, sources
from warp_jax.gemma.tokenizer import Tokenizer

GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
GEMMA4 = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<|turn>' + role + '\n' + m['content'] | trim + '<turn|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "the movie was"},
                {"role": "assistant", "content": "great fun"},
                {"role": "user", "content": "and the plot?"}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoint directories with a Gemma-style SentencePiece model (no dummy prefix,
    byte fallback, Gemma's special ids and chat pieces) and a Gemma 3 or Gemma 4 template."""
    root = tmp_path_factory.mktemp("tok")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(data.review_corpus(400)), model_writer=buffer, vocab_size=320,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>"],
        add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, byte_fallback=True, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2)
    dirs = {}
    for name, template in (("gemma3", GEMMA3), ("gemma4", GEMMA4)):
        directory = root / name
        directory.mkdir()
        (directory / "tokenizer.model").write_bytes(buffer.getvalue())
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
            "chat_template": template}))
        dirs[name] = directory
    return dirs


@pytest.mark.parametrize("name, turn_end", [("gemma3", "<end_of_turn>"), ("gemma4", "<turn|>")])
def test_rendered_prompts_equal_transformers_chat_template_tokens(checkpoints, name,
                                                                  turn_end, tmp_path):
    directory = checkpoints[name]
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    ours = Tokenizer(directory / "tokenizer.model")
    rows = [{"prompt": CONVERSATION}, {"prompt": CONVERSATION[1:2]}, {"prompt": "plain text"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = sources.ChatTemplate(directory)
    prompts = sources.load_prompts(path, template=template, chat=True)
    expected = [CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": "plain text"}]]
    for prompt, conversation in zip(prompts, expected, strict=True):
        want = reference.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
        assert ours.encode(prompt) == list(want), (prompt, conversation)
    assert template.stop_pieces() == (turn_end,)
    assert ours.piece_ids([turn_end])  # a piece of its own: a completion stops on it


def test_every_format_gives_the_same_prompts(tmp_path):
    plain = ["the movie was", "a film with", "the cast is"]
    rows = [{"prompt": p, "other": i} for i, p in enumerate(plain)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("prompt,other\n" + "".join(
        f"{p},{i}\n" for i, p in enumerate(plain)))
    (tmp_path / "p.txt").write_text("\n".join(plain) + "\n\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), shards / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), shards / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), shards / "test-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("p.jsonl", "p.json", "wrapped.json", "p.parquet", "p.csv", "p.txt", "saved"):
        assert sources.load_prompts(tmp_path / name) == plain, name
    assert sources.load_prompts(shards, split="train") == plain
    assert sources.load_prompts(tmp_path / "saved_dict", split="train") == plain
    assert sources.load_prompts(tmp_path / "saved_dict", split="test") == plain[:1]
    renamed = tmp_path / "q.jsonl"
    renamed.write_text("".join(json.dumps({"question": p}) + "\n" for p in plain))
    assert data.read_prompts(renamed, "question") == plain


def test_preferences_in_trls_formats(checkpoints, tmp_path):
    template = sources.ChatTemplate(checkpoints["gemma3"])
    user = [{"role": "user", "content": "the movie was"}]
    good, bad = [{"role": "assistant", "content": "great"}], [{"role": "assistant",
                                                               "content": "dull"}]
    rows = [
        {"prompt": "the movie was", "chosen": "great", "rejected": "dull"},  # standard
        {"prompt": user, "chosen": good, "rejected": bad},  # conversational
        {"chosen": "the movie was great", "rejected": "the movie was dull"},  # implicit
        {"chosen": user + good, "rejected": user + bad},  # implicit conversational
    ]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "standard.parquet")
    datasets.Dataset.from_list(rows[1:2]).save_to_disk(str(tmp_path / "conversational"))
    (tmp_path / "implicit.jsonl").write_text(json.dumps(rows[2]) + "\n")
    (tmp_path / "implicit_chat.json").write_text(json.dumps([rows[3]]))
    head = template.prompt(user)
    whole = template.conversation(user + good)
    rendered = sources.Preference(head, whole[len(head):],
                                  template.conversation(user + bad)[len(head):], separator="")
    assert whole.startswith(head) and rendered.chosen.startswith("great")
    assert sources.load_preferences(tmp_path / "standard.parquet", template=template) == [
        sources.Preference("the movie was", "great", "dull")]
    assert sources.load_preferences(tmp_path / "conversational", template=template) == [
        rendered]
    # TRL's split of an implicit prompt: the common prefix, its last space kept with the answers.
    assert sources.load_preferences(tmp_path / "implicit.jsonl", template=template) == [
        sources.Preference("the movie was", " great", " dull", separator="")]
    assert sources.load_preferences(tmp_path / "implicit_chat.json", template=template) == [
        rendered]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_one_line_naming_the_file_row_and_field(tmp_path):
    template = sources.ChatTemplate(None)
    good = {"role": "user", "content": "hi"}
    cases = [
        ([{"text": "a"}], "row 1: no field 'prompt' (fields: text)"),
        ([{"prompt": "a"}, {"prompt": 3}], "row 2, field 'prompt': expected a string or a "
                                           "list of messages, got int"),
        ([{"prompt": [good, good]}], "row 1, field 'prompt': message 1 is 'user' where "
                                     "'assistant' is expected"),
        ([{"prompt": [good, {"role": "assistant", "content": "x"}]}],
         "row 1, field 'prompt': ends with the assistant, where a prompt expects the user's "
         "turn"),
        ([{"prompt": [{"role": "user", "content": 5}]}],
         "row 1, field 'prompt': message 0 is not a {'role': one of"),
        ([{"prompt": " "}], "row 1, field 'prompt': an empty prompt"),
    ]
    for rows, message in cases:
        path = _write_jsonl(tmp_path / "p.jsonl", rows)
        with pytest.raises(ValueError) as info:
            sources.load_prompts(path, template=template)
        assert str(info.value) == f"{path}, {message}" or str(info.value).startswith(
            f"{path}, {message}"), (str(info.value), message)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no prompts"):
        sources.load_prompts(empty)
    with pytest.raises(ValueError, match=r"No such file or directory"):
        sources.load_prompts(tmp_path / "missing.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "b"}])}
                         ).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"two: a dataset of splits \['train', 'test'\]; "
                                         r"choose one"):
        sources.load_prompts(tmp_path / "two")


def test_train_reward_model_takes_conversational_parquet_and_refuses_bad_rows(
        checkpoints, tmp_path, capsys):
    user = [{"role": "user", "content": "the movie was"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]}
            for good, bad in [("great fun", "dull"), ("lovely", "awful")] * 12]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    argv = ["--data", str(tmp_path / "prefs.parquet"), "--workdir", str(tmp_path / "rm"),
            "--steps", "2", "--batch-size", "8", "--max-len", "24", "--tokenizer",
            str(checkpoints["gemma4"] / "tokenizer.model"), "--chat-template",
            str(checkpoints["gemma4"])]
    metrics = train_reward_model.run(train_reward_model._parser().parse_args(argv))
    assert set(metrics) >= {"accuracy", "loss"}
    plain = [{"question": "the movie was", "good": g, "bad": b}
             for g, b in [("great fun", "dull"), ("lovely", "awful")] * 12]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(plain)}).save_to_disk(
        str(tmp_path / "saved"))
    metrics = train_reward_model.run(train_reward_model._parser().parse_args([
        "--data", str(tmp_path / "saved"), "--split", "train", "--prompt-column", "question",
        "--chosen-column", "good", "--rejected-column", "bad", "--workdir",
        str(tmp_path / "rm_plain"), "--steps", "2",
        "--batch-size", "8", "--max-len", "24", "--tokenizer-vocab", "40"]))
    assert set(metrics) >= {"accuracy", "loss"}
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [rows[0], {**rows[0], "chosen": "x", "rejected": 1}])
    with pytest.raises(SystemExit) as info:
        train_reward_model.main(["--data", str(bad), "--workdir", str(tmp_path / "rm2"),
                                 "--chat-template", str(checkpoints["gemma4"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [
        f"error: {bad}, row 2, field 'rejected': expected a string or a list of messages, "
        "got int"], err
    assert not (tmp_path / "rm2").exists()
