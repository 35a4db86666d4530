"""Run under `horovodrun -np 2 --gloo` (argument gloo) or `mpirun -np 2` (argument mpi).

Checks the installed stack for real: Horovod allreduce and broadcast on the global set and
on a process set, and (mpi) mpi4py in the same processes with a sub-communicator collective.
Prints OK on success; any wrong value raises. Every op is named: Horovod numbers unnamed
ops per process, so ranks that ran different numbers of them would wait on different names.
"""

import sys

import torch

mode = sys.argv[1]
if mode == "mpi":
    from mpi4py import MPI
import horovod.torch as hvd  # noqa: E402 (mpi4py first in "mpi" mode: it initialises MPI)

evens = hvd.ProcessSet([0])
if mode == "mpi":
    hvd.init(comm=MPI.COMM_WORLD, process_sets=[evens])  # Horovod: shares MPI with mpi4py
else:
    hvd.init(process_sets=[evens])
rank, size = hvd.rank(), hvd.size()
assert size == 2, size

total = hvd.allreduce(torch.tensor([rank + 1.0, 10.0]), op=hvd.Sum, name="sum")
assert total.tolist() == [3.0, 20.0], total
mean = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Average, name="avg")
assert mean.item() == 0.5, mean
got = hvd.broadcast(torch.full((3,), float(rank + 7)), root_rank=1, name="bcast")
assert got.tolist() == [8.0] * 3, got
if evens.included():
    one = hvd.allreduce(torch.tensor([5.0]), op=hvd.Sum, process_set=evens, name="set_sum")
    assert one.item() == 5.0, one
    b = hvd.broadcast(torch.tensor([9.0]), root_rank=0, process_set=evens, name="set_bcast")
    assert b.item() == 9.0
both = hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, process_set=hvd.global_process_set, name="global_sum")
assert both.item() == 2.0

if mode == "mpi":
    world = MPI.COMM_WORLD
    assert world.Get_rank() == rank
    sub = world.Split(color=0, key=-rank)  # reversed order: rank 1 becomes sub-rank 0
    assert sub.Get_rank() == 1 - rank
    import numpy as np

    buf = np.array([rank + 1.0])
    sub.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    assert buf[0] == 3.0
    v = sub.bcast(f"from {rank}", root=0)
    assert v == "from 1", v
print(f"OK {mode} rank {rank}")
