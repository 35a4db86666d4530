"""What packing costs a round in compute (issue 42): the codec's encode and decode of IST's shared
change (weights and momentum: phase 1 packs and unpacks both shards, phase 2 packs one average
and unpacks two) and an int8 delivery of half the blocks, at S = N = 2, against 50 training
steps of the S=2 subnetwork measured in the same process, alternating, the fastest of each.

    python tools/codec_cost.py [--width 0.125] [--batch 64] [--repeats 5]
"""

import argparse
import time

import torch

from hist.comm.quantized import Codec, pack_delivery, unpack_delivery
from hist.models import build_model, make_plan, shared_and_partitioned


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("preact_resnet101", 10, a.width).to(memory_format=torch.channels_last)
    shared, blocks = shared_and_partitioned(model)
    n = -(-2 * sum(p.numel() for p in shared) // 512) * 512  # weights and momentum, two whole shards
    moving = 2 * sum(p.numel() for ps in blocks[: len(blocks) // 2] for p in ps)  # about half move at S=2
    change, block, zero = torch.randn(n) * 1e-3, torch.randn(moving) * 1e-3, torch.zeros(moving)

    def codec_round(precision, topk):
        codec, t = Codec(precision, topk), time.perf_counter()
        for shard in change.view(2, -1):
            codec.decode(codec.encode(shard)[0], n // 2)
        packed = codec.encode(change.view(2, -1)[0])[0]
        codec.decode(packed, n // 2), codec.decode(packed, n // 2)
        unpack_delivery(pack_delivery([block.clone()], [zero], "int8"), [block.clone()], [zero], "int8")
        return time.perf_counter() - t

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.set_subnetwork(make_plan(0, 0, len(blocks), 2).blocks[0])
    x = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,))

    def step():
        t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    step(), step()
    kinds = (("int8", 0.0), ("int4", 0.0), ("int4", 0.01))
    steps, codec = [], {k: [] for k in kinds}
    for _ in range(a.repeats):
        steps.append(step())
        for k in kinds:
            codec[k].append(codec_round(*k))
    s = min(steps)
    print(f"ResNet-101 width {a.width}: {n} shared values, {moving} moving block values; step {s:.3f} s")
    for (precision, topk), ts in codec.items():
        print(f"{precision} top-k {topk:g}: {min(ts):.3f} s a round, {100 * min(ts) / (50 * s):.2f}% of 50 steps")


if __name__ == "__main__":
    main()
