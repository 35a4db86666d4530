"""Run under mpirun: several hist-train runs in turn, in one launch.

Arguments: hist-train's own, one run after another, separated by a lone `--`. Each run goes
through hist-train's command itself (hist.cli.train), and Horovod is shut down after each, so
the next starts it afresh with its own process sets, as a new launch would. Why: on 2 cores a
launch of 4 ranks costs ~10 s of imports and startup, a tiny run ~2 s.
"""

import sys

import horovod.torch as hvd

from hist.cli import train


def runs(argv: list[str]) -> list[list[str]]:
    out = [[]]
    for word in argv:
        if word == "--":
            out.append([])
        else:
            out[-1].append(word)
    return [r for r in out if r]


if __name__ == "__main__":
    for args in runs(sys.argv[1:]):
        train.main(args, prog_name="hist-train", standalone_mode=False)
        hvd.shutdown()
