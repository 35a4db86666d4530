"""IST in your own training script: `hist.IST` and `hist.LocalSGD` (docs/api.md has the contract).

`ist = hist.IST(model, blocks, optimizer, local_iters=50)` before your loop, which stays as it
is; `with ist.full_model(): evaluate(model)` to evaluate. Ranks, subnetworks and the engine come
from the launcher (horovodrun or mpirun: Horovod + MPI; torchrun: torch.distributed; one
process: neither)."""

from .session import IST, LocalSGD, RoundEndChoice, Training

__all__ = ["IST", "LocalSGD", "RoundEndChoice", "Training"]
