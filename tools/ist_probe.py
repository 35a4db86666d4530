"""Run hist-train and, at every evaluation, also score each subnetwork and the full model under
other evaluation choices, on the same ranks; one JSON line per evaluation (rank 0).

    horovodrun -np 2 python tools/ist_probe.py OUT.jsonl -- synthetic --arch ... (hist-train's options)

Why: the run's own evaluation scores one model, the full network with each partitioned branch
scaled by 1/S and BatchNorm recalibrated; when it falls, this says whether the subnetworks fell
too (training) or only their combination (evaluation). Rows per evaluation:
  full/auto/recalibrate   the run's own figure (must equal the timing file's)
  full/auto/batch         each test batch's own BatchNorm statistics (--eval-bn batch)
  full/none/recalibrate   the full network unscaled (--test-scale none)
  full/auto/recal64       recalibrated on 64 batches instead of --bn-batches
  sub<s>/recalibrate      subnetwork s of the round just trained, alone (scale 1), recalibrated
  sub<s>/batch            the same with batch statistics
  big/...                 the same choices on a larger test set (--probe-test, synthetic only)
  train/...               the same choices on the training images, unaugmented
Training is not changed: evaluation draws no random numbers, and the model is left as the run's
own evaluation leaves it.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

import hist.engine.loop as loop
import hist.launch as launch
from hist.cli import train as train_command
from hist.data import DeviceLoader, Split, synthetic
from hist.models import recalibrate_batchnorm

STATE: dict = {}


@torch.no_grad()
def score(model, loader, sync, batch_size, bn, calibration):
    if bn == "batch":
        model.train()
    else:
        recalibrate_batchnorm(model, calibration)
        model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader.eval_batches(batch_size, sync.rank, sync.size):
        out = model(x).float()
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    total = sync.sum_over_world(sums.tolist())
    return round(100.0 * total[1] / total[2], 3), round(total[0] / total[2], 5)


def probed_evaluate(model, test, calibration, sync, scale, batch_size, bn="recalibrate"):
    calibration = list(calibration)
    own = ORIGINAL(model, test, calibration, sync, scale, batch_size, bn)
    method, cfg, train_data = STATE["method"], STATE["cfg"], STATE["train_data"]
    rows = {}
    tests = [("", test)]
    if "big" in STATE:
        tests.append(("big/", STATE["big"]))
    tests.append(("train/", STATE["train_eval"]))
    many = list(train_data.calibration_batches(64))
    plan = getattr(method, "plan", None)
    groups = plan.blocks if plan is not None else ()
    for prefix, data in tests:
        model.set_full(scale)
        rows[prefix + "full/auto/recalibrate"] = score(model, data, sync, batch_size, "recalibrate", calibration)
        rows[prefix + "full/auto/batch"] = score(model, data, sync, batch_size, "batch", calibration)
        rows[prefix + "full/auto/recal64"] = score(model, data, sync, batch_size, "recalibrate", many)
        model.set_full(1.0)
        rows[prefix + "full/none/recalibrate"] = score(model, data, sync, batch_size, "recalibrate", calibration)
        if len(groups) > 1:
            for s, blocks in enumerate(groups):
                model.set_subnetwork(blocks)
                rows[prefix + f"sub{s}/recalibrate"] = score(model, data, sync, batch_size, "recalibrate", calibration)
                rows[prefix + f"sub{s}/batch"] = score(model, data, sync, batch_size, "batch", calibration)
    # leave the model as the run's own evaluation does
    model.set_full(scale)
    recalibrate_batchnorm(model, calibration)
    model.train()
    if sync.rank == 0:
        line = {
            "eval": STATE["count"],
            "unix": time.time(),
            "own": own[1],
            "scale": scale,
            "lr_note": "see the timing file's rounds/lr",
            "rows": rows,
        }
        with open(STATE["out"], "a") as f:
            f.write(json.dumps(line) + "\n")
        torch.save(
            {"model": model.state_dict(), "blocks": groups, "config": cfg.as_dict()},
            f"{STATE['out']}.{STATE['count']}.pt",
        )
    STATE["count"] += 1
    return own


def probed_train(cfg, model, method, sync, train_data, test_data, *args, **kwargs):
    STATE.update(method=method, cfg=cfg, train_data=train_data, count=0)
    whole = Split(train_data.images.cpu().numpy(), train_data.labels.cpu().numpy())
    STATE["train_eval"] = DeviceLoader(
        whole, cfg.dataset, cfg.eval_batch_size, test_data.device, cfg.seed, augment=False
    )
    if cfg.dataset == "synthetic" and STATE.get("probe_test"):
        _, big = synthetic(cfg.seed, cfg.synthetic_size, STATE["probe_test"])
        STATE["big"] = DeviceLoader(big, "synthetic", cfg.eval_batch_size, test_data.device, cfg.seed, augment=False)
    return ORIGINAL_TRAIN(cfg, model, method, sync, train_data, test_data, *args, **kwargs)


ORIGINAL = loop.evaluate
ORIGINAL_TRAIN = launch.train


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit(__doc__)
    cut = argv.index("--")
    mine, rest = argv[:cut], argv[cut + 1 :]
    STATE["out"] = mine[0]
    if "--probe-test" in mine:
        STATE["probe_test"] = int(mine[mine.index("--probe-test") + 1])
    loop.evaluate = probed_evaluate
    launch.train = probed_train
    train_command.main(args=rest, prog_name="hist-train")


if __name__ == "__main__":
    main()
