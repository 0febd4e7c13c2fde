r"""Merge fine-tuned checkpoints with WARP's SLERP and LITI: `python -m warp_jax.merge`.

    python -m warp_jax.merge --init SFT_DIR --policy RUN1_DIR --policy RUN2_DIR [--policy ...] \
        [--weights 0.5,0.5] [--method slerp|lerp] [--granularity layer|tensor] \
        [--eta 0.3 | --eta-grid 0,0.3,1] --out OUT_DIR

Reads Hugging Face safetensors directories (Gemma 1/2/3/4, any dtype) one group of tensors at a
time (a transformer block, or one tensor outside the blocks), so host memory holds about
(M + 2) groups, never a whole model; orbax checkpoints of ours (with `--hf-config`) are
restored whole. Writes one sharded safetensors checkpoint per eta (with
the init's config and tokenizer files), and a report of each block's task-vector cosine and
norm ratio between the first two policies (the paper's Fig. 11) as a table and a PNG. Inputs
are checked before anything is written; the output appears only when complete.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence

import jax
import numpy as np
from tqdm import tqdm

from warp_jax import merging, stacking
from warp_jax.checkpoint import read_tree
from warp_jax.evaluation import task_vector_stats
from warp_jax.gemma import abstract_params, hf, shards
from warp_jax.workdir import os_error_line, writable

_COPIED = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json")


class TensorSource:
    """A checkpoint's tensors by Hugging Face name, with shapes known up front.

    A safetensors directory is read lazily (headers first, one group of tensors at a time).
    An orbax checkpoint of ours (Gemma params, or a state holding them as `params`) is
    restored whole and named through `hf.params_to_hf`; it needs `hf_config`, a Hugging Face
    directory whose config.json describes the architecture (and whose tokenizer files are
    copied to the output). A WARP stage's checkpoint (`checkpoints/iter1`) holds its M runs
    stacked: `run` picks one, else `runs()` gives each.
    """

    def __init__(self, directory: str | pathlib.Path, hf_config: str | None = None,
                 run: int | None = None):
        self.directory = pathlib.Path(directory)
        self.files_dir = self.directory
        self.location: dict[str, shards.File] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._runs: list[dict[str, np.ndarray]] = []
        files = sorted(self.directory.glob("*.safetensors"))
        if files:
            for file in map(shards.File, files):
                self.location |= dict.fromkeys(file.shapes, file)
                self.shapes |= file.shapes
        else:
            self._read_orbax(hf_config, run)
        config = self.files_dir / "config.json"
        try:
            self.config = json.loads(config.read_text()) if config.exists() else {}
        except ValueError as e:
            raise ValueError(f"{config}: not JSON ({e})") from None

    def _read_orbax(self, hf_config: str | None, run: int | None) -> None:
        if not self.directory.is_dir():
            raise ValueError(f"{self.directory}: no such checkpoint directory")
        tree = read_tree(self.directory)
        params = tree.get("params", tree) if isinstance(tree, dict) else None
        if not isinstance(params, dict) or "input_embedding" not in params:
            raise ValueError(f"{self.directory}: an orbax checkpoint without Gemma params "
                             "(expected a params tree or a state with 'params')")
        if hf_config is None:
            raise ValueError(f"{self.directory} is an orbax checkpoint: give --hf-config, a "
                             "Hugging Face directory with the architecture's config.json")
        self.files_dir = pathlib.Path(hf_config)
        cfg = hf.read_config(self.files_dir)
        embedding = params["input_embedding"]
        num_runs = embedding.shape[0] if embedding.ndim == 3 else None
        runs = [params]
        if stacking.is_stacked(params, stacking.param_shapes(abstract_params(cfg)), num_runs):
            if run is not None and not 0 <= run < num_runs:
                raise ValueError(f"--run {run}: {self.directory} holds runs 0..{num_runs - 1}")
            runs = [jax.tree.map(lambda x, m=m: x[m], params) for m in range(num_runs)]
            runs = runs if run is None else [runs[run]]
        self._runs = [hf.params_to_hf(p, cfg, include_lm_head=False) for p in runs]
        self.shapes = {name: value.shape for name, value in self._runs[0].items()}

    def runs(self) -> list[TensorSource]:
        """One source per run this checkpoint holds (itself, unless stacked runs)."""
        if len(self._runs) <= 1:
            return [self]
        sources = [copy.copy(self) for _ in self._runs]
        for source, tensors in zip(sources, self._runs, strict=True):
            source._runs = [tensors]
        return sources

    def load(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        if self._runs:
            (tensors,) = self._runs  # stacked runs: load from each of `runs()`
            return {n: tensors[n] for n in names}
        out = {}
        for file in {self.location[n]: None for n in names}:
            out |= file.load([n for n in names if self.location[n] is file])
        return out


def _groups(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The unit of reading and merging: a transformer block, or one tensor outside them."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(hf.block_of(name) or name, []).append(name)
    return list(groups.items())


# config.json fields that describe the file, not what the model computes.
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                "architectures", "id2label", "label2id", "num_labels", "problem_type"}


def check_compatible(init: TensorSource, policies: Sequence[TensorSource]) -> None:
    """Raises `ValueError` naming the first difference between the init and a policy in
    architecture or tensors; warns (one line per policy) where their configs differ in a
    setting that changes what the model computes (the merge follows the init's)."""
    arch = init.config.get("model_type")
    for p in policies:
        other = p.config.get("model_type")
        if arch and other and arch != other:
            raise ValueError(f"mismatched architectures: {init.directory} is {arch!r}, "
                             f"{p.directory} is {other!r}")
        missing = sorted(set(init.shapes) - set(p.shapes))
        extra = sorted(set(p.shapes) - set(init.shapes))
        if missing:
            raise ValueError(f"{p.directory}: missing tensor(s) {missing[:5]} of the init")
        if extra:
            raise ValueError(f"{p.directory}: tensor(s) {extra[:5]} not in the init")
        for name, shape in init.shapes.items():
            if p.shapes[name] != shape:
                raise ValueError(f"{p.directory}: tensor {name!r} has shape {p.shapes[name]}, "
                                 f"the init's is {shape}")
    for p in policies:
        differ = sorted(k for k in set(init.config) | set(p.config) if k not in _BOOKKEEPING
                        and init.config.get(k) != p.config.get(k))
        if differ:
            print(f"warning: {p.directory}'s config.json differs from the init's in "
                  + ", ".join(f"{k} ({init.config.get(k)!r} -> {p.config.get(k)!r})"
                              for k in differ[:5])
                  + ("" if len(differ) <= 5 else f" and {len(differ) - 5} more")
                  + "; the merge is written with the init's", file=sys.stderr)


def merge(init_dir, policy_dirs: Sequence, out_dir, *, weights: Sequence[float] | None = None,
          method: str = "slerp", granularity: str = "layer", etas: Sequence[float] = (1.0,),
          subdirs: bool = False, hf_config: str | None = None, run: int | None = None,
          progress: bool = True) -> dict[str, dict[str, float]]:
    """Merges the policies' task vectors and writes `liti(init, merged, eta)` for each eta
    (into `out_dir`, or `out_dir/eta_<eta>` when `subdirs`, with as many digits as tell the
    etas apart); returns the per-block report.

    A policy that is a WARP stage's checkpoint contributes each of its stacked runs (or run
    `run`). A tensor that is not finite is refused, naming it and its checkpoint; nothing is
    written then."""
    if method not in ("slerp", "lerp"):
        raise ValueError(f"--method must be 'slerp' or 'lerp', got {method!r}")
    if granularity not in ("layer", "tensor"):
        raise ValueError(f"--granularity must be 'layer' or 'tensor', got {granularity!r}")
    for eta in etas:
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
    if not policy_dirs:
        raise ValueError("give at least one --policy")
    if len(set(etas)) < len(etas):
        raise ValueError(f"the etas repeat a value: {list(etas)}")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} exists; choose a new --out directory")
    writable(out_dir.parent, "--out")
    _remove_stopped_merges(out_dir)
    init = TensorSource(init_dir, hf_config, run)
    if len(init.runs()) > 1:
        raise ValueError(f"--init {init_dir} holds {len(init.runs())} stacked runs; pick one "
                         "with --run")
    policies = [s for d in policy_dirs for s in TensorSource(d, hf_config, run).runs()]
    merging.validate_weights(weights, len(policies))
    check_compatible(init, policies)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent or "."))
    try:
        (tmp / _OWNER).write_text(str(os.getpid()))
        targets = {eta: (tmp / name if subdirs else tmp) for eta, name in zip(
            etas, eta_dirs(etas), strict=True)}
        groups = _groups(list(init.shapes))
        writers = {}
        for eta, target in targets.items():
            target.mkdir(parents=True, exist_ok=True)
            writers[eta] = shards.ShardWriter(target, len(groups))
        report: dict[str, dict[str, float]] = {}
        for key, names in tqdm(groups, desc="merging", unit="group", disable=not progress):
            base = _finite(init, init.load(names))
            runs = [_finite(p, p.load(names)) for p in policies]
            if len(runs) > 1 and key.startswith("layer_"):
                stats = task_vector_stats(base, runs, dict.fromkeys(names, key))[key]
                report[key] = {"task_cosine": stats["task_cosine"],
                               "norm_ratio": stats["task_norm_ratio"]}
            if method == "slerp":
                label = {n: key if granularity == "layer" else None for n in names}
                merged = merging.slerp_tree(base, runs, weights, groups=label)
            else:
                merged = merging.lerp_tree(base, runs, weights)
            del runs
            for eta in targets:
                writers[eta].write(merging.liti_tree(base, merged, eta))
            del base, merged
        for eta, target in targets.items():
            writers[eta].close()
            for name in _COPIED:
                if (init.files_dir / name).exists():
                    shutil.copy(init.files_dir / name, target / name)
        if report:
            (tmp / "merge_report.json").write_text(json.dumps(report, indent=1))
            _plot(report, tmp / "merge_report.png")
        (tmp / _OWNER).unlink()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


_OWNER = "merge.pid"  # in a merge's temporary directory: the process writing it


def _remove_stopped_merges(out_dir: pathlib.Path) -> None:
    """Removes the temporary directories that merges into `out_dir` left when they were
    killed (their process is gone), with one warning line each."""
    for tmp in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
        try:
            pid = int((tmp / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # not a merge's, or one being set up
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"warning: removed {tmp}, the unfinished output of a merge that was stopped",
              file=sys.stderr)


def eta_dirs(etas: Sequence[float]) -> list[str]:
    """`eta_<eta>` for each of the (distinct) etas, with the fewest digits (at least 6) that
    give every eta its own name: 0.1234567 and 0.1234568 do not share `eta_0.123457`."""
    for digits in range(6, 18):
        names = [f"eta_{eta:.{digits}g}" for eta in etas]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the etas repeat a value: {list(etas)}")


def _finite(source: TensorSource, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name, value in tensors.items():
        if value.dtype.kind not in "biu" and not np.isfinite(value.astype(np.float32)).all():
            raise ValueError(f"{source.directory}: tensor {name!r} has non-finite values "
                             "(NaN or inf); a diverged run cannot be merged")
    return tensors


def _plot(report: dict[str, dict[str, float]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, stat, title in ((axes[0], "task_cosine", "task-vector cosine between runs"),
                            (axes[1], "norm_ratio", "task-vector norm ratio")):
        ax.hist([v[stat] for v in report.values()], bins=20, color="tab:red", alpha=0.8)
        ax.set_title(f"{title} ({len(report)} blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m warp_jax.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True,
                        help="the shared initialisation (HF dir or orbax checkpoint)")
    parser.add_argument("--policy", action="append", required=True,
                        help="a fine-tuned run (HF dir or orbax checkpoint); repeat for M runs")
    parser.add_argument("--run", type=int, help="of a WARP stage's checkpoint (its M runs "
                        "stacked, e.g. checkpoints/iter1): merge only this run (default: each "
                        "run is a policy)")
    parser.add_argument("--hf-config", help="for orbax checkpoints: a Hugging Face directory "
                                            "whose config.json (and tokenizer) they follow")
    parser.add_argument("--weights", type=_floats, help="M weights summing to 1 (default 1/M)")
    parser.add_argument("--method", default="slerp", choices=("slerp", "lerp"))
    parser.add_argument("--granularity", default="layer", choices=("layer", "tensor"),
                        help="one SLERP angle per transformer block (the paper) or per tensor")
    eta = parser.add_mutually_exclusive_group()
    eta.add_argument("--eta", type=float, help="LITI towards the init (default 1: the merge)")
    eta.add_argument("--eta-grid", type=_floats, help="several etas, one output dir each")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    args = parser.parse_args(argv)
    etas = args.eta_grid if args.eta_grid is not None else [
        1.0 if args.eta is None else args.eta]
    try:
        report = merge(args.init, args.policy, args.out, weights=args.weights,
                       method=args.method, granularity=args.granularity, etas=etas,
                       subdirs=args.eta_grid is not None, hf_config=args.hf_config,
                       run=args.run)
    except (ValueError, OSError) as e:
        print(f"error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)
    if report:
        print("| block | task-vector cosine | norm ratio |\n|---|---:|---:|")
        for key, stats in report.items():
            print(f"| {key} | {stats['task_cosine']:.4f} | {stats['norm_ratio']:.4f} |")
    print(f"wrote {args.out} ({', '.join(eta_dirs(etas))})")


if __name__ == "__main__":
    main()
