"""Times mergekit's task-vector SLERP (`nuslerp`, per tensor) on the benchmark's tensors.

Run by `experiments/benchmarks/merging.py` with the Python of a separate venv that has
mergekit and torch; prints one JSON line: {"seconds": median over repeats}.
"""

import json
import statistics
import sys
import time

import torch
from mergekit.merge_methods.nuslerp import nuslerp

from experiments.benchmarks._trees import make_trees


def main(repeats: int) -> None:
    torch.set_grad_enabled(False)
    init, p0, p1 = ({k: torch.from_numpy(v) for k, v in t.items()} for t in make_trees())

    def merge():
        return {k: init[k] + nuslerp(0.5, p0[k] - init[k], p1[k] - init[k], flatten=True)
                for k in init}

    merge()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        merge()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "torch": torch.__version__}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
