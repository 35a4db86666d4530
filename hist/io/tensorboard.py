"""A live view of a run in TensorBoard (`--tensorboard DIR`), written by rank 0.

The HDF5 timing file stays the record of truth; this writer receives the same rounds and
evaluations and turns them into scalars, grouped by kind: `train/` (loss, lr), `test/`
(top-1, top-5, loss), `time/` (images/s, data, compute and sync seconds of the mean rank),
`comm/` (bytes per round), `ist/` (blocks per subnetwork). Every option goes in once, as a
text table and as TensorBoard hyperparameters, so runs can be compared in its own views.
TensorBoard is imported only here, so a run without `--tensorboard` imports none of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import HistError


class TensorBoardWriter:
    def __init__(self, logdir: Path, config: dict, images_per_step: int, start_round: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as e:
            raise HistError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard")
        try:
            # purge_step: a resumed run drops what its killed predecessor wrote past the checkpoint
            self.writer = SummaryWriter(str(logdir), purge_step=start_round or None)
        except OSError as e:
            raise HistError(f"cannot write --tensorboard {logdir}: {e.strerror}; choose a writable folder")
        self.images_per_step = images_per_step
        if not start_round:
            rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
            self.writer.add_text("options", "| option | value |\n| --- | --- |\n" + rows, 0)
            plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            for summary in hparams(plain, {"test/top1": 0.0, "test/top5": 0.0}):
                self.writer.file_writer.add_summary(summary)

    def add_round(self, round_index, steps, epoch, wall_s, per_rank, lr=float("nan"), blocks=None) -> None:
        w, r = self.writer, round_index
        busy = {k: float(np.mean(per_rank[f"{k}_s"])) for k in ("data", "compute", "sync")}
        w.add_scalar("train/loss", float(np.mean(per_rank["loss"])), r)
        w.add_scalar("train/lr", lr, r)
        w.add_scalar("train/epoch", epoch, r)
        round_s = sum(busy.values())
        if round_s > 0:
            w.add_scalar("time/images_per_s", steps * self.images_per_step * len(per_rank["loss"]) / round_s, r)
        for k, v in busy.items():
            w.add_scalar(f"time/{k}_s", v, r)
        w.add_scalar("time/wall_s", wall_s, r)
        w.add_scalar("comm/bytes_per_round", float(np.sum(per_rank["bytes_sent"])), r)
        for s, n in enumerate(blocks or ()):
            w.add_scalar(f"ist/blocks_subnet{s}", n, r)

    def add_eval(self, round_index, epoch, wall_s, loss, accuracy, top5) -> None:
        for tag, value in (("test/loss", loss), ("test/top1", accuracy), ("test/top5", top5)):
            self.writer.add_scalar(tag, value, round_index)
        self.writer.flush()

    def finish(self, status: str, total_wall_s: float) -> None:
        self.writer.add_text("status", f"{status} after {total_wall_s:.1f} s")
        self.writer.close()
