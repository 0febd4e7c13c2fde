"""What a workdir records about the run that made it, checked before a run resumes there;
output paths checked before any work.

`config.json` holds the resolved config of the first run in a workdir (`arguments.json` the
arguments and data fingerprints of a tool's, `record`). A rerun with values that differ in any
field that changes results stops with one line naming the fields; `LAYOUT_FIELDS` change how
the job is laid out on the devices, not what it computes, so a resumed job may change them (on
another slice, say).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import jax

# Fields a resumed run may change: the device layout (the sampler's too), the update's memory
# schedule, the check that the job fits and the consent to a proxy at chance.
LAYOUT_FIELDS = ("mesh.data", "mesh.fsdp", "mesh.model", "rl.decode_layout", "rl.remat",
                 "rl.microbatches", "plan_first", "reward.allow_chance")


def writable(path: str | os.PathLike, flag: str = "--workdir") -> pathlib.Path:
    """`path` as a directory this process can write (made if missing); a `ValueError` naming
    `flag` if it is a file, below a file, or not writable."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        raise ValueError(f"{flag} {str(path)!r}: a file, not a directory") from None
    except NotADirectoryError:
        raise ValueError(f"{flag} {str(path)!r}: a path below a file") from None
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r}: not writable ({e.strerror})") from None
    return path


def flatten(tree: dict) -> dict[str, Any]:
    """A config's fields (`ConfigDict.to_dict()` or its JSON) by dotted name, as JSON values
    (tuples become lists)."""
    def walk(prefix: str, value: Any):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(f"{prefix}{key}.", item)
        else:
            yield prefix[:-1], value

    return json.loads(json.dumps(dict(walk("", tree))))


def record_config(config, workdir: pathlib.Path) -> None:
    """Writes `config` to `workdir/config.json`, or compares it with the one recorded there.

    Raises `ValueError` naming every changed field outside `LAYOUT_FIELDS` (nothing is
    written then); otherwise records the config, layout fields as given now.
    """
    record(config.to_dict(), workdir, "config.json", LAYOUT_FIELDS, "another config")


def record(values: dict, workdir: pathlib.Path, name: str, may_change: tuple[str, ...],
           what: str) -> None:
    """Writes `values` (a JSON-able dict) to `workdir/name`, or compares them with those
    recorded there: raises `ValueError` naming every changed field outside `may_change`
    ("W was made with `what`: ..."; nothing is written then), else records them as given."""
    path = workdir / name
    current = flatten(values)
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
            recorded = flatten(recorded)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not the config this workdir recorded ({e}); restore it, "
                             "or use a new --workdir") from None
        before, now = ({k: d.get(k, "<absent>") for k in set(recorded) | set(current)}
                       for d in (recorded, current))
        changed = [f"{k} ({before[k]!r} -> {now[k]!r})" for k in sorted(before)
                   if k not in may_change and before[k] != now[k]]
        if changed:
            raise ValueError(f"{workdir} was made with {what}: {', '.join(changed)}; "
                             f"rerun with the recorded values ({name} there), or use a "
                             "new --workdir")
    tmp = path.with_suffix(f".{jax.process_index()}.tmp")  # every process, atomically
    tmp.write_text(json.dumps(values, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fingerprint(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (of every file below a directory, by relative path)."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def os_error_line(e: OSError) -> str:
    """An OS error as one line naming the path and the reason, without the errno."""
    if e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)


def writable_file(path: str | os.PathLike, flag: str) -> pathlib.Path:
    """`path` as a file this process can create or replace (its directory made if missing);
    a `ValueError` naming `flag` if it is a directory or its directory is not writable."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: a directory, not a file")
    try:
        writable(path.parent, flag)
    except ValueError as e:
        raise ValueError(f"{e} (the directory of {str(path)!r})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r}: not writable")
    return path
