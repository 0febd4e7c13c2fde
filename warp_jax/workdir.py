"""What a workdir records about the run that made it, checked before a run resumes there.

`config.json` holds the resolved config of the first run in a workdir. A rerun with a config
that differs in any field that changes results stops with one line naming the fields;
`LAYOUT_FIELDS` change how the job is laid out on the devices, not what it computes, so a
resumed job may change them (on another slice, say).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import jax

# Fields a resumed run may change: the device layout (the sampler's too), the update's memory
# schedule and the check that the job fits.
LAYOUT_FIELDS = ("mesh.data", "mesh.fsdp", "mesh.model", "rl.decode_layout", "rl.remat",
                 "rl.microbatches", "plan_first")


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
    path = workdir / "config.json"
    current = flatten(config.to_dict())
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
                   if k not in LAYOUT_FIELDS and before[k] != now[k]]
        if changed:
            raise ValueError(f"{workdir} was made with another config: {', '.join(changed)}; "
                             "rerun with the recorded values (config.json there), or use a "
                             "new --workdir")
    tmp = path.with_suffix(f".{jax.process_index()}.tmp")  # every process, atomically
    tmp.write_text(json.dumps(config.to_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
