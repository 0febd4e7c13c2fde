"""The main job: `python -m experiments.gemma_warp` (WARP on Gemma; default: the CPU demo).

The end-to-end WARP loop (issue 7) is not built yet: until it is, this entry point prints
the experiment it will run and exits without training anything.
"""

import argparse

PLAN = """WARP CPU demo (Ramé et al. 2024, Algorithm 1), as it will run:
  1. train a SentencePiece tokenizer and a tiny Gemma SFT policy on a built-in text task
  2. train a reward model on oracle-labelled preference pairs
  3. baselines: REINFORCE with the SFT anchor and with the EMA anchor (beta 0.1, mu 0.01)
  4. WARP: I = 2 iterations x M = 2 runs; SLERP the runs, LITI with eta = 0.3
  5. the KL-reward Pareto front over eta in (0, 0.1, 0.3, 0.5, 0.8, 1)

Not implemented yet: the WARP loop and its experiment (issue 7). Nothing was trained.
The merge functions are ready to use: see README.md, "Merging policies"."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="workdir/cpu_demo", help="output directory")
    parser.parse_args()
    print(PLAN)


if __name__ == "__main__":
    main()
