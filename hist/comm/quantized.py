"""Compressed communication: a codec for one round's changes, the averaging built on it, and
the quantized block payload. Engine-free: it moves bytes only through a synchroniser's
`alltoall_bytes`/`allgather_bytes` (Horovod's MPI or torch.distributed behind them).

Why a change and not the weights: at a round's start every rank holds the same reference, so
only the round's change travels, and its rounding never touches the weights themselves.

The codec (`Codec`) packs a flat fp32 vector, cut into chunks of `CHUNK` values, as
- a bf16 scale per chunk (int8, int4), the chunk's largest magnitude over 127 or 7;
- with top-k, the `k` largest magnitudes of each chunk and their positions (one byte each:
  a chunk holds 256 values);
- the values in fp32, fp16, int8, or int4 (two to a byte).
Its size depends only on the vector's length, so every rank knows every message's size.

A block delivery (`pack_delivery`) sends one owner's change since a reference every rank
holds (the blocks at the last full synchronisation); sender and receivers keep the decoded
bits, so every holder of the block holds the same ones.

Quantized values cannot be summed in flight, so the average is two collectives of packed bytes
(`CompressedAverage`): each rank sends shard j of its packed change to rank j (all-to-all);
rank j decodes the N shards, averages them, packs that average again and every rank gathers
the packed averages (allgather). Each rank sends 2(N-1)/N of the packed size, what a ring
allreduce sends of the unpacked one. Both packings keep an error-feedback residual: what one
round did not send is added to the next round's change. Every rank decodes the same gathered
bytes in the same order, so every rank ends with the same bits.
"""

from __future__ import annotations

import torch

from .traffic import CHUNK, codec_nbytes, delivery_nbytes, topk_per_chunk

# Largest integer of each quantized value kind (symmetric: -Q..Q).
QMAX = {"int8": 127, "int4": 7}
FLOAT_BYTES = {"fp32": 4, "fp16": 2}
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


def _as(buf: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """`n` values of `dtype` from the head of a byte buffer (copied: any alignment)."""
    size = torch.empty((), dtype=dtype).element_size()
    return buf[: n * size].clone().view(dtype)


class Codec:
    """Packs and unpacks a vector whose length is a multiple of `CHUNK`."""

    def __init__(self, precision: str, topk: float = 0.0):
        self.precision, self.k = precision, topk_per_chunk(topk)
        self.sparse = self.k < CHUNK

    def nbytes(self, n: int) -> int:
        return codec_nbytes(n, self.precision, self.k)

    def encode(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the packed bytes, what the receiver will decode from them)."""
        m = v.numel() // CHUNK
        x = v.reshape(m, CHUNK)
        if self.sparse:
            idx = x.abs().topk(self.k, dim=1, sorted=False).indices.sort(dim=1).values
            vals = x.gather(1, idx)
        else:
            idx, vals = None, x
        parts = []
        if self.precision in QMAX:
            q = QMAX[self.precision]
            scale = (vals.abs().amax(dim=1) / q).to(torch.bfloat16)
            s = scale.float().unsqueeze(1)
            codes = torch.round(vals / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-q, q)
            got = codes * s
            parts.append(_bytes(scale))
        else:
            codes = vals.to(FLOAT_DTYPES[self.precision])
            got = codes.float()
        if idx is not None:
            parts.append(idx.to(torch.uint8).reshape(-1))
        if self.precision == "int4":
            u = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
            if u.numel() % 2:
                u = torch.cat([u, u.new_zeros(1)])
            parts.append(u[0::2] | (u[1::2] << 4))
        elif self.precision == "int8":
            parts.append(codes.to(torch.int8).view(torch.uint8).reshape(-1))
        else:
            parts.append(_bytes(codes))
        packed = torch.cat(parts)
        assert packed.numel() == self.nbytes(v.numel())
        dense = got if idx is None else torch.zeros_like(x).scatter_(1, idx, got)
        return packed, dense.reshape(-1)

    def decode(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        m = n // CHUNK
        per = self.k
        at = 0
        scale = None
        if self.precision in QMAX:
            scale = _as(buf, torch.bfloat16, m).float().unsqueeze(1)
            at = 2 * m
        idx = None
        if self.sparse:
            idx = buf[at : at + m * per].to(torch.int64).reshape(m, per)
            at += m * per
        body = buf[at:]
        if self.precision == "int4":
            u = torch.stack([body & 0xF, body >> 4], dim=1).reshape(-1)[: m * per]
            vals = (u.to(torch.int16) - 8).float().reshape(m, per)
        elif self.precision == "int8":
            vals = body[: m * per].clone().view(torch.int8).float().reshape(m, per)
        else:
            vals = _as(body, FLOAT_DTYPES[self.precision], m * per).float().reshape(m, per)
        if scale is not None:
            vals = vals * scale
        if idx is None:
            return vals.reshape(-1)
        return torch.zeros(m, CHUNK, device=buf.device).scatter_(1, idx, vals).reshape(-1)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _padded(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


def _apply(tensors, references, change: torch.Tensor) -> None:
    """tensors := references + change, one function for sender and receivers (the same bits)."""
    offset = 0
    for t, ref in zip(tensors, references):
        k = t.numel()
        t.copy_(ref + change[offset : offset + k].view(t.shape).to(t.dtype))
        offset += k


@torch.no_grad()
def pack_delivery(tensors, references, precision: str) -> torch.Tensor:
    """The sender's packed change of `tensors` since `references` (which every receiver holds);
    the sender keeps what it sent: `tensors` become references + the decoded change."""
    change = _flat(tensors) - _flat(references)
    v = change.new_zeros(_padded(change.numel()))
    v[: change.numel()] = change
    packed, sent = Codec(precision).encode(v)
    _apply(tensors, references, sent)
    assert packed.numel() == delivery_nbytes(change.numel(), precision)
    return packed


@torch.no_grad()
def unpack_delivery(buf: torch.Tensor, tensors, references, precision: str) -> None:
    """A receiver's side of `pack_delivery`: `tensors` become the sender's bits."""
    n = sum(t.numel() for t in tensors)
    _apply(tensors, references, Codec(precision).decode(buf.to(tensors[0].device), _padded(n)))


class CompressedAverage:
    """Averages tensors over every rank by their change since a reference every rank holds,
    packed by a `Codec`, with this rank's two error-feedback residuals (`state_dict`): the
    change it did not send, and the part of its shard's average it did not send back."""

    def __init__(self, precision: str, topk: float = 0.0):
        self.codec = Codec(precision, topk)
        self.residual: torch.Tensor | None = None  # this rank's whole change, as padded
        self.shard_residual: torch.Tensor | None = None  # the average of this rank's shard

    def shard_len(self, n: int, size: int) -> int:
        chunks = -(-n // CHUNK)
        return -(-chunks // size) * CHUNK

    @torch.no_grad()
    def average(self, sync, tensors, references) -> None:
        """Every rank's `tensors` become reference + the average change (the same bits on every
        rank). Collective: every rank calls it with tensors of the same shapes."""
        tensors = list(tensors)
        size = sync.size
        change = _flat(tensors) - _flat(references)
        n = change.numel()
        shard = self.shard_len(n, size)
        v = change.new_zeros(size * shard)
        v[:n] = change
        if self.residual is None or self.residual.numel() != v.numel():
            self.residual = torch.zeros_like(v)
            self.shard_residual = change.new_zeros(shard)
        v += self.residual
        packed, sent = zip(*(self.codec.encode(s) for s in v.view(size, shard)))
        self.residual = v - torch.cat(sent)
        each = self.codec.nbytes(shard)
        got = sync.alltoall_bytes(torch.cat(packed)).view(size, each)
        mean = self.codec.decode(got[0], shard)
        for j in range(1, size):  # in rank order: the same sum wherever it is computed
            mean += self.codec.decode(got[j], shard)
        mean = mean / size + self.shard_residual
        packed_mean, sent_mean = self.codec.encode(mean)
        self.shard_residual = mean - sent_mean
        gathered = sync.allgather_bytes(packed_mean).view(size, each)
        _apply(tensors, references, torch.cat([self.codec.decode(gathered[j], shard) for j in range(size)]))

    def state_dict(self) -> dict:
        return {"residual": self.residual, "shard_residual": self.shard_residual}

    def load_state_dict(self, state: dict) -> None:
        self.residual, self.shard_residual = state.get("residual"), state.get("shard_residual")
