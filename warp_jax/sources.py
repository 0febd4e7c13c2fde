"""Prompts and preference pairs from the files users hold: text, jsonl, json, parquet, csv, a
directory of shards or a `datasets.save_to_disk` directory, each row plain text or a
conversation (TRL's formats), conversations rendered by the checkpoint's own chat template.

Rows are read locally (pyarrow for parquet and csv, `datasets.load_from_disk` for saved
datasets): nothing is downloaded. Every bad row is a `ValueError` naming the file, the row
(1-based) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's files
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str
    # How a response follows its prompt: a space for plain-text pairs; nothing where the
    # prompt is a rendered chat turn or was split off a shared prefix.
    separator: str = " "


@dataclasses.dataclass(frozen=True)
class Row:
    source: str  # the file (a shard's, in a directory of shards)
    number: int  # 1-based, within `source`
    values: dict

    def where(self, field: str | None = None) -> str:
        return f"{self.source}, row {self.number}" + (f", field {field!r}" if field else "")


def iter_rows(path: str | os.PathLike, split: str = "", on_error: str = "raise"):
    """The rows of a local dataset, in file order. A directory is a `save_to_disk` dataset
    (a `DatasetDict` needs `split` unless it has one split) or holds shards of one format
    (with `split`, the shards whose name starts with it, as the Hub names them:
    `train-00000-of-00002.parquet`). A `.txt` file holds one prompt a line (`{"prompt":
    line}`). With `on_error="skip"`, a jsonl line that is not a JSON object is skipped with a
    warning instead of refused."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path}: No such file or directory")
    if path.is_dir():
        if any((path / name).exists() for name in _SAVED):
            yield from _saved(path, split)
            return
        shards = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                        and (not split or p.name.startswith(split)))
        kinds = {p.suffix for p in shards}
        if not shards or len(kinds) > 1:
            raise ValueError(f"{path}: expected a save_to_disk dataset or shards of one of "
                             f"{', '.join(SUFFIXES)}"
                             + (f" named {split}*" if split else "")
                             + (f"; found {sorted(kinds)}" if kinds else ""))
        for shard in shards:
            yield from _file(shard, on_error)
    else:
        yield from _file(path, on_error)


def _file(path: pathlib.Path, on_error: str) -> list[Row]:
    suffix = path.suffix
    if suffix not in SUFFIXES[:-1]:  # .txt, or any other file: text, one prompt a line
        from warp_jax.data import utf8

        with open(path, "rb") as f:
            lines = [(n, utf8(raw, path, n)) for n, raw in enumerate(f, start=1)]
        return [Row(str(path), n, {"prompt": line}) for n, line in lines if line.strip()]
    document = _json_document(path) if suffix == ".json" else None
    if document is None and suffix in (".jsonl", ".json"):  # one JSON object a line
        return _jsonl(path, on_error)
    if suffix == ".json":
        if isinstance(document, dict) and len(document) == 1 and isinstance(
                next(iter(document.values())), list):  # {"data": [...]}
            document = next(iter(document.values()))
        if not isinstance(document, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or one per line)")
        return [_row(path, n, value) for n, value in enumerate(document, start=1)]
    if suffix in (".parquet", ".csv"):
        import pyarrow.csv
        import pyarrow.parquet

        try:
            table = (pyarrow.parquet.read_table(path) if suffix == ".parquet"
                     else pyarrow.csv.read_csv(path))
        except (OSError, pyarrow.ArrowInvalid) as e:
            raise ValueError(f"{path}: not a {suffix[1:]} file ({str(e).splitlines()[0]})"
                             ) from None
        return [Row(str(path), n, values)
                for n, values in enumerate(table.to_pylist(), start=1)]


def _json_document(path: pathlib.Path) -> Any:
    """A .json file's one JSON document, or None where it holds one object a line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _jsonl(path: pathlib.Path, on_error: str):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError is one too
                value = ValueError(f"{path}, row {number}: not a JSON line ({e})")
            try:
                if isinstance(value, ValueError):
                    raise value
                row = _row(path, number, value)
            except ValueError as e:
                if on_error == "raise":
                    raise ValueError(str(e)) from None
                warnings.warn(f"{e} (skipped)", stacklevel=3)
                continue
            yield row


def _row(path, number: int, value: Any) -> Row:
    if not isinstance(value, dict):
        raise ValueError(f"{path}, row {number}: not a JSON object")
    return Row(str(path), number, value)


def _saved(path: pathlib.Path, split: str) -> list[Row]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if not split and len(splits) == 1:
            split = splits[0]
        if split not in dataset:
            raise ValueError(f"{path}: a dataset of splits {splits}; choose one"
                             + (f" (not {split!r})" if split else ""))
        dataset = dataset[split]
    return [Row(f"{path}", n, values) for n, values in enumerate(dataset.to_list(), start=1)]


def _field(row: Row, name: str) -> Any:
    if name not in row.values:
        raise ValueError(f"{row.where()}: no field {name!r} (fields: "
                         f"{', '.join(map(str, row.values)) or 'none'})")
    return row.values[name]


def messages(row: Row, field: str, value: Any, *, ends_with: str | None = None) -> list[dict]:
    """A conversation (a list of `{"role", "content"}`, roles from `ROLES`, a system message
    first if any, then user and assistant turns alternating), checked; `ends_with` the role
    its last message must have."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{row.where(field)}: expected a string or a non-empty list of "
                         "messages")
    expected = "user"
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                and message.get("role") in ROLES):
            raise ValueError(f"{row.where(field)}: message {i} is not a {{'role': one of "
                             f"{ROLES}, 'content': a string}}")
        role = message["role"]
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise ValueError(f"{row.where(field)}: message {i} is {role!r} where "
                             f"{expected!r} is expected (roles alternate user, assistant "
                             "after an optional system message)")
        expected = "assistant" if role == "user" else "user"
    if ends_with and value[-1]["role"] != ends_with:
        raise ValueError(f"{row.where(field)}: ends with the {value[-1]['role']}, where a "
                         + ("prompt expects the user's turn" if ends_with == "user"
                            else f"{ends_with} turn is expected"))
    return [{"role": m["role"], "content": m["content"]} for m in value]


# Gemma's chat turns, as instruction-tuned checkpoints were trained on them.
CHAT_PIECES = ("<start_of_turn>", "<end_of_turn>")


def gemma_turns(conversation: list[dict], generation_prompt: bool) -> str:
    """A conversation in Gemma's turn markers, written by hand (the fallback of a checkpoint
    without a chat template): a system message opens the first user turn, the assistant is
    the `model`, and the generation prompt opens the model's turn."""
    start, end = CHAT_PIECES
    turns, system = [], ""
    for m in conversation:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
            continue
        role = "model" if m["role"] == "assistant" else "user"
        turns.append(f"{start}{role}\n{system if role == 'user' else ''}{m['content']}{end}\n")
        system = system if role == "model" else ""
    return "".join(turns) + (f"{start}model\n" if generation_prompt else "")


class ChatTemplate:
    """A checkpoint's chat template: transformers' `apply_chat_template` on the tokenizer
    files of a local directory (`tokenizer_config.json`, `chat_template.jinja`, ...), the
    generation prompt added. Where the directory has none, Gemma's turn markers written by
    hand (`gemma_turns`), said in one warning line."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = directory
        self._loaded, self._tokenizer, self._warned = False, None, False
        self.used = False  # whether it rendered anything

    @property
    def tokenizer(self):
        """The directory's transformers tokenizer if it has a chat template (read on first
        use), else None."""
        if not self._loaded:
            self._loaded = True
            if self.directory and (pathlib.Path(self.directory) /
                                   "tokenizer_config.json").exists():
                import transformers

                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(self.directory), local_files_only=True)
                self._tokenizer = tokenizer if tokenizer.chat_template else None
        return self._tokenizer

    def _render(self, conversation: list[dict], generation_prompt: bool) -> str:
        self.used = True
        if self.tokenizer is not None:
            text = self._tokenizer.apply_chat_template(
                conversation, add_generation_prompt=generation_prompt, tokenize=False)
            bos = self._tokenizer.bos_token
            return text.removeprefix(bos) if bos else text  # the tokenizer adds BOS itself
        if not self._warned:
            print(f"warning: {self.directory or 'no checkpoint directory'} has no chat "
                  "template: conversations are wrapped in Gemma's turn markers "
                  "(<start_of_turn>, <end_of_turn>)", file=sys.stderr)
            self._warned = True
        return gemma_turns(conversation, generation_prompt)

    def prompt(self, conversation: list[dict]) -> str:
        """A conversation that ends with the user's turn, rendered up to the model's turn."""
        return self._render(conversation, True)

    def conversation(self, conversation: list[dict]) -> str:
        """A whole conversation, rendered."""
        return self._render(conversation, False)

    def stop_pieces(self) -> tuple[str, ...]:
        """The piece that closes the model's turn (`<end_of_turn>`; Gemma 4's `<turn|>`):
        where a rendered answer ends."""
        if self.tokenizer is None:
            return CHAT_PIECES[1:]
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        after = self.conversation(probe).rsplit("a", 1)[1]
        ids = self._tokenizer.encode(after, add_special_tokens=False)
        piece = self._tokenizer.convert_ids_to_tokens(ids[:1])
        special = set(self._tokenizer.all_special_tokens) | set(
            self._tokenizer.get_added_vocab())
        return tuple(p for p in piece if p in special)


def load_prompts(path: str | os.PathLike, column: str = "prompt", split: str = "", *,
                 template: ChatTemplate | None = None, chat: bool = False) -> list[str]:
    """The prompts of a local dataset's `column`: strings as they are (wrapped in a user turn
    and rendered with `template` when `chat`), conversations rendered with `template`."""
    prompts = []
    for row in iter_rows(path, split):
        value = _field(row, column)
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{row.where(column)}: an empty prompt")
            if chat:
                value = _need(template, row, column).prompt([{"role": "user", "content": value}])
        elif isinstance(value, list):
            value = _need(template, row, column).prompt(
                messages(row, column, value, ends_with="user"))
        else:
            raise ValueError(f"{row.where(column)}: expected a string or a list of messages, "
                             f"got {type(value).__name__}")
        prompts.append(value)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _need(template: ChatTemplate | None, row: Row, field: str) -> ChatTemplate:
    if template is None:
        raise ValueError(f"{row.where(field)}: a conversation, and no chat template to "
                         "render it")
    return template


def load_preferences(path: str | os.PathLike, columns: Sequence[str] = ("prompt", "chosen",
                                                                          "rejected"),
                     split: str = "", *, template: ChatTemplate | None = None,
                     on_error: str = "raise") -> list[Preference]:
    """Preference pairs of a local dataset, in TRL's formats: `{prompt, chosen, rejected}`
    strings; a conversation as the prompt and lists of assistant messages as the answers; or
    the implicit-prompt form, `chosen` and `rejected` alone, split at their common prefix
    (whole messages for conversations; for strings, characters, a space kept with the
    answers). Conversations are rendered with `template`. With `on_error="skip"`, a bad row is
    skipped with a warning instead of refused."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    prompt_column, chosen_column, rejected_column = columns
    pairs = []
    for row in iter_rows(path, split, on_error):
        try:
            pairs.append(_pair(row, prompt_column, chosen_column, rejected_column, template))
        except ValueError as e:
            if on_error == "raise":
                raise
            warnings.warn(f"{e} (skipped)", stacklevel=2)
    return pairs


def _pair(row: Row, prompt_column: str, chosen_column: str, rejected_column: str,
          template: ChatTemplate | None) -> Preference:
    chosen, rejected = _field(row, chosen_column), _field(row, rejected_column)
    prompt = row.values.get(prompt_column)
    for field, value in ((chosen_column, chosen), (rejected_column, rejected)):
        if not isinstance(value, str | list):
            raise ValueError(f"{row.where(field)}: expected a string or a list of messages, "
                             f"got {type(value).__name__}")
    if prompt is None:  # implicit prompt
        if isinstance(chosen, str) and isinstance(rejected, str):
            cut = 0
            while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
                cut += 1
            if 0 < cut and chosen[cut - 1] == " ":
                cut -= 1
            return Preference(chosen[:cut], chosen[cut:], rejected[cut:], separator="")
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise ValueError(f"{row.where()}: {chosen_column!r} and {rejected_column!r} must "
                             "both be strings or both conversations")
        chosen = messages(row, chosen_column, chosen, ends_with="assistant")
        rejected = messages(row, rejected_column, rejected, ends_with="assistant")
        shared = 0
        while (shared < min(len(chosen), len(rejected)) - 1
               and chosen[shared] == rejected[shared]):
            shared += 1
        return _rendered(row, chosen[:shared], chosen[shared:], rejected[shared:],
                         _need(template, row, chosen_column))
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return Preference(prompt, chosen, rejected)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    conversation = messages(row, prompt_column, prompt, ends_with="user")
    answers = [[{"role": "assistant", "content": value}] if isinstance(value, str)
               else _answer(row, field, value)
               for field, value in ((chosen_column, chosen), (rejected_column, rejected))]
    return _rendered(row, conversation, *answers, _need(template, row, prompt_column))


def _answer(row: Row, field: str, value: list) -> list[dict]:
    if not value or any(not isinstance(m, dict) or m.get("role") != "assistant"
                        or not isinstance(m.get("content"), str) for m in value):
        raise ValueError(f"{row.where(field)}: expected the assistant's message(s), "
                         "{'role': 'assistant', 'content': a string}")
    return value


def _rendered(row: Row, prompt: list[dict], chosen: list[dict], rejected: list[dict],
              template: ChatTemplate) -> Preference:
    """The pair as text: the rendered prompt (up to the model's turn) and each answer as the
    rest of its rendered conversation."""
    if not prompt:
        raise ValueError(f"{row.where()}: the two conversations share no prompt")
    head = template.prompt(prompt)
    answers = []
    for answer in (chosen, rejected):
        whole = template.conversation(prompt + answer)
        if not whole.startswith(head):
            raise ValueError(f"{row.where()}: the chat template renders the prompt "
                             "differently inside the conversation; cannot split it")
        answers.append(whole[len(head):])
    return Preference(head, *answers, separator="")


def read_preferences(path: str | os.PathLike, on_error: str = "raise") -> list[Preference]:
    """`{prompt, chosen, rejected}` string pairs of a local dataset (`load_preferences`
    without a chat template)."""
    return load_preferences(path, on_error=on_error)
