#!/bin/bash
# The ViT measurement of issue 41: full CIFAR-10, 6 epochs, every worker on the whole training set;
# one process, then IST at 2 processes, then local SGD at 2 processes (Horovod + MPI).
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PATH=$PWD/.venv/bin:$PATH
D=${HIST_DATA:-../shared/data/cifar10}; O=runs/vit-cifar; mkdir -p $O
stamp() {  # the code a run starts with
  { git log -1 --format=%H; sha256sum examples/vit_cifar.py hist/api/*.py hist/methods/*.py hist/comm/*.py; date +%s; } > $O/$1.code
}
stamp single-np1
OMP_NUM_THREADS=1 python examples/vit_cifar.py --data-dir $D --data-split full --threads 1 --results $O/single-np1.jsonl > $O/single-np1.out 2>&1
stamp ist-np2
OMP_NUM_THREADS=1 horovodrun -np 2 -H localhost:2 python examples/vit_cifar.py --data-dir $D --data-split full --threads 1 --results $O/ist-np2.jsonl > $O/ist-np2.out 2>&1
stamp local-sgd-np2
OMP_NUM_THREADS=1 horovodrun -np 2 -H localhost:2 python examples/vit_cifar.py --data-dir $D --data-split full --threads 1 --method local-sgd --results $O/local-sgd-np2.jsonl > $O/local-sgd-np2.out 2>&1
date +%s > $O/finished
