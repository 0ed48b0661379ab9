"""Where the materializer keeps the base and the experts between candidates: its three memory modes.

Each merged tensor is stored once as a (K + 1, N) block: row 0 the base, rows 1..K the experts.
Half-precision checkpoints (bf16 / fp16) keep the experts' own weights in the checkpoint's dtype (a
bf16 difference of two bf16 weights is not a bf16 number, so storing the task vector in bf16 would
lose bits); every other dtype keeps float32 task vectors, expert - base, computed once. Either way
`stream` hands the materializer, tensor by tensor, the float32 base (N,) and task vectors (K, N) that
the pre-mode materializer held resident: float32(expert) - float32(base), the same bits in every mode.

* `resident`: the blocks live on the device in the checkpoint's dtype; a half-precision tensor is
  widened to float32 into one work buffer the size of the largest tensor (float32 blocks are used
  as they are).
* `host`: the blocks live in host memory (pinned when the device is CUDA, so copies are DMA) and are
  copied to one of two device staging buffers tensor by tensor: on CUDA the copy of the next tensor
  runs on a side stream while this one is merged (double buffering, ordered by events); on CPU the
  same code path copies synchronously.
* `disk`: the blocks are memory-mapped from a one-time safetensors cache (`TaskVectorCache`, keyed
  by the models' content fingerprints, written atomically); each tensor is copied out of the map into
  a staging buffer (through a pinned bounce buffer on CUDA) and its pages are released afterwards
  (`madvise(MADV_DONTNEED)`), so the process holds no more of the cache than the tensor in flight.

How many bytes each mode needs on the device and on the host is `evomerge.merge.memory_plan`.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from evomerge._atomic import atomic_file
from evomerge.merge.checkpoint import ModelFolder

__all__ = ["MODES", "TaskVectorCache", "TensorStore", "default_cache_dir", "stored_dtype"]

MODES = ("resident", "host", "disk")
CACHE_FORMAT = "evomerge-task-vectors-1"  # bump when the block layout changes: old caches are then ignored
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def stored_dtype(checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The dtype a block is stored in: the checkpoint's when it is 16-bit, else float32 (task vectors)."""
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.float32


def default_cache_dir() -> Path:
    """`EVOMERGE_CACHE_DIR`, else `$XDG_CACHE_HOME/evomerge`, else `~/.cache/evomerge`."""
    explicit = os.environ.get("EVOMERGE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge"


def _block(base: ModelFolder, experts: Sequence[ModelFolder], name: str, dtype: torch.dtype) -> torch.Tensor:
    """(K + 1, N) on CPU in `dtype`: the base, then the experts (16-bit) or their task vectors (float32)."""
    b = base.get_tensor(name).reshape(-1)
    out = torch.empty((len(experts) + 1, b.numel()), dtype=dtype)
    if dtype == torch.float32:
        out[0].copy_(b)  # as the pre-mode materializer: base to float32, expert to float32, subtract
        for k, expert in enumerate(experts):
            out[k + 1].copy_(expert.get_tensor(name).reshape(-1))
            out[k + 1].sub_(out[0])
    else:
        out[0].copy_(b)
        for k, expert in enumerate(experts):
            out[k + 1].copy_(expert.get_tensor(name).reshape(-1))
    return out


# ----------------------------------------------------------------------------- the disk cache

@dataclass(frozen=True)
class TaskVectorCache:
    """The one-time safetensors file of the `disk` mode: one (K + 1, N) block per tensor, in model order."""

    path: Path
    key: str

    @classmethod
    def locate(cls, base: ModelFolder, experts: Sequence[ModelFolder], names: Sequence[str], dtype: torch.dtype,
               cache_dir: str | os.PathLike | None = None) -> "TaskVectorCache":
        """The cache file for these models: keyed by each model's content fingerprint
        (`ModelFolder.weights_fingerprint`), the tensor names and shapes, and the stored dtype."""
        digest = hashlib.sha256(CACHE_FORMAT.encode())
        for folder in (base, *experts):
            digest.update(f"\0{folder.weights_fingerprint()}".encode())
        for name in names:
            digest.update(f"\0{name}:{list(base.shape(name))}".encode())
        digest.update(f"\0{dtype}".encode())
        key = digest.hexdigest()
        return cls(Path(cache_dir or default_cache_dir()) / f"task-vectors-{key[:32]}.safetensors", key)

    def is_valid(self) -> bool:
        """A complete cache for this key: the key in its header and as many bytes as the header maps."""
        try:
            data_start, header = self.read_header()
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
            return (header.get("__metadata__", {}).get("key") == self.key
                    and self.path.stat().st_size == data_start + end)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return False

    def read_header(self) -> tuple[int, dict]:
        with open(self.path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return 8 + length, json.loads(handle.read(length))

    def write(self, base: ModelFolder, experts: Sequence[ModelFolder], names: Sequence[str],
              dtype: torch.dtype) -> None:
        """Write the cache atomically (a temporary sibling renamed into place), one tensor in memory at a time."""
        k, size = len(experts), torch.tensor([], dtype=dtype).element_size()
        header: dict = {"__metadata__": {"key": self.key, "format": CACHE_FORMAT}}
        offset = 0
        for name in names:
            numel = 1
            for dim in base.shape(name):
                numel *= int(dim)
            nbytes = (k + 1) * numel * size
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": [k + 1, numel],
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
        with atomic_file(self.path, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name in names:
                handle.write(_block(base, experts, name, dtype).view(torch.uint8).numpy().tobytes())

    def ensure(self, base: ModelFolder, experts: Sequence[ModelFolder], names: Sequence[str],
               dtype: torch.dtype) -> bool:
        """Write the cache unless a valid one is there; True when it was written now."""
        if self.is_valid():
            return False
        self.write(base, experts, names, dtype)
        return True


# ----------------------------------------------------------------------------- the store

class TensorStore:
    """The base and experts of every merged tensor, in one memory mode; `stream` yields float32 views.

    Build with `TensorStore.load(mode, base, experts, names, device)`. Views yielded by `stream` are
    valid until the next one is asked for (they live in reused buffers).
    """

    def __init__(self, mode: str, names: Sequence[str], numels: Sequence[int], num_experts: int,
                 dtype: torch.dtype, device: torch.device):
        if mode not in MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.names = list(names)
        self.numels = [int(n) for n in numels]
        self.num_experts = int(num_experts)
        self.dtype = dtype  # stored dtype (see `stored_dtype`)
        self.device = torch.device(device)
        self.max_numel = max(self.numels)
        self._blocks: list[torch.Tensor] = []  # resident: device (K+1, N); host: host (K+1, N)
        self._offsets: list[int] = []  # disk: byte offset of each block in the map
        self._map: mmap.mmap | None = None
        self._file = None
        self.cache: TaskVectorCache | None = None
        self.cache_written = False
        self._work: torch.Tensor | None = None  # float32 (K+1) * max_numel, 16-bit dtypes only
        self._staging: list[torch.Tensor] = []
        self._bounce: list[torch.Tensor] = []
        self._side = None  # the CUDA copy stream

    @property
    def widens(self) -> bool:
        """True when blocks are 16-bit and each tensor is widened to float32 in a work buffer."""
        return self.dtype != torch.float32

    @classmethod
    def load(cls, mode: str, base: ModelFolder, experts: Sequence[ModelFolder], names: Sequence[str],
             device: torch.device, *, cache_dir: str | os.PathLike | None = None) -> "TensorStore":
        dtype = stored_dtype(base.dtype(names[0]))
        numels = []
        for name in names:
            numel = 1
            for dim in base.shape(name):
                numel *= int(dim)
            numels.append(numel)
        store = cls(mode, names, numels, len(experts), dtype, device)
        cuda = store.device.type == "cuda"
        if mode == "disk":
            store.cache = TaskVectorCache.locate(base, experts, names, dtype, cache_dir)
            store.cache_written = store.cache.ensure(base, experts, names, dtype)
            store._open_map()
        else:
            for name in names:
                block = _block(base, experts, name, dtype)
                if mode == "resident":
                    block = block.to(store.device)
                elif cuda:
                    block = block.pin_memory()
                store._blocks.append(block)
        store._allocate_buffers()
        return store

    def _open_map(self) -> None:
        data_start, header = self.cache.read_header()
        self._file = open(self.cache.path, "rb")
        # A private map: writable for torch.frombuffer (never written, so no page is copied).
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        self._offsets = [data_start + header[name]["data_offsets"][0] for name in self.names]

    def _allocate_buffers(self) -> None:
        k1, n = self.num_experts + 1, self.max_numel
        if self.widens:
            self._work = torch.empty(k1 * n, dtype=torch.float32, device=self.device)
        if self.mode != "resident":
            # Zeroed: committed now, as device memory is, so the process's peak is the plan's figure
            # whatever the order of the tensors (an untouched CPU page would only count once used).
            self._staging = [torch.zeros(k1 * n, dtype=self.dtype, device=self.device) for _ in range(2)]
            if self.mode == "disk" and self.device.type == "cuda":
                self._bounce = [torch.empty(k1 * n, dtype=self.dtype).pin_memory() for _ in range(2)]

    # ---------------------------------------------------------------- bytes held
    def device_bytes(self) -> int:
        """Bytes this store holds on the device (blocks, staging and work buffers)."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        held = sum(b.numel() * size for b in self._blocks) if self.mode == "resident" else 0
        held += sum(b.numel() * size for b in self._staging)
        return held + (self._work.numel() * 4 if self._work is not None else 0)

    def host_bytes(self) -> int:
        """Bytes this store holds in host memory (the host mode's blocks, the disk mode's bounce buffers)."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        held = sum(b.numel() * size for b in self._blocks) if self.mode == "host" else 0
        return held + sum(b.numel() * size for b in self._bounce)

    # ---------------------------------------------------------------- streaming
    def stream(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(index, base (N,), task vectors (K, N)) float32 on the device, for each tensor index in order."""
        order = list(range(len(self.names))) if indices is None else list(indices)
        if self.mode == "resident":
            for i in order:
                yield (i, *self._views(self._blocks[i].view(-1), i))
            return
        yield from self._double_buffered(order)

    def _views(self, flat: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (base, task vectors) of block i, given as a flat (K + 1) * N tensor of the stored dtype."""
        n, k = self.numels[i], self.num_experts
        if not self.widens:
            return flat[:n], flat[n:(k + 1) * n].view(k, n)
        work = self._work[:(k + 1) * n]
        work.copy_(flat[:(k + 1) * n])  # 16-bit -> float32, exact
        base, tvs = work[:n], work[n:].view(k, n)
        tvs.sub_(base)  # float32(expert) - float32(base), as the pre-mode materializer computed it
        return base, tvs

    def _source(self, i: int) -> torch.Tensor:
        """Block i as a flat CPU tensor: the host copy, or a view of the cache's map."""
        if self.mode == "host":
            return self._blocks[i].view(-1)
        size = (self.num_experts + 1) * self.numels[i]
        return torch.frombuffer(self._map, dtype=self.dtype, count=size, offset=self._offsets[i])

    def _release(self, i: int) -> None:
        """Drop block i's mapped pages from this process (disk mode): the page cache keeps them if it can."""
        if self.mode != "disk" or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        start = self._offsets[i] // page * page
        size = torch.tensor([], dtype=self.dtype).element_size()
        stop = self._offsets[i] + (self.num_experts + 1) * self.numels[i] * size
        self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def _double_buffered(self, order: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        if cuda and self._side is None:  # one copy stream for the store's life: a stream() left early (an
            self._side = torch.cuda.Stream(self.device)  # error mid-candidate) still orders its copies first
        side = self._side
        if cuda:  # nothing enqueued before this pass (the last candidate's merges) may see its copies
            side.wait_stream(torch.cuda.current_stream(self.device))
        copied: list = [None, None]  # CUDA events: the copy into staging[j] is done
        consumed: list = [None, None]  # CUDA events: the merge has finished reading staging[j]

        def issue(position: int) -> None:
            i, j = order[position], position % 2
            size = (self.num_experts + 1) * self.numels[i]
            source = self._source(i)
            if not cuda:
                self._staging[j][:size].copy_(source)
                self._release(i)
                return
            if self.mode == "disk":  # pageable map -> pinned bounce (once its last copy has left) -> device
                if copied[j] is not None:
                    copied[j].synchronize()
                self._bounce[j][:size].copy_(source)
                self._release(i)
                source = self._bounce[j][:size]
            with torch.cuda.stream(side):
                if consumed[j] is not None:
                    side.wait_event(consumed[j])
                self._staging[j][:size].copy_(source, non_blocking=True)
                copied[j] = torch.cuda.Event()
                copied[j].record(side)

        if order:
            issue(0)
        for position, i in enumerate(order):
            j = position % 2
            if position + 1 < len(order):
                issue(position + 1)  # the next tensor's copy overlaps this tensor's merge
            if cuda:
                torch.cuda.current_stream(self.device).wait_event(copied[j])
            yield (i, *self._views(self._staging[j], i))
            if cuda:
                consumed[j] = torch.cuda.Event()
                consumed[j].record(torch.cuda.current_stream(self.device))

    def float32(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh float32 (base, task vectors) of tensor i (for inspection; `stream` is the fast path)."""
        flat = self._source(i) if self.mode != "resident" else self._blocks[i].view(-1)
        n, k = self.numels[i], self.num_experts
        block = flat.to(device=self.device, dtype=torch.float32).view(k + 1, n).clone()
        if self.widens:
            block[1:].sub_(block[0])
        return block[0], block[1:]

    def close(self) -> None:
        self._blocks.clear()
        self._staging.clear()
        self._bounce.clear()
        self._work = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of the map is still alive: the GC closes it with the last one
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
