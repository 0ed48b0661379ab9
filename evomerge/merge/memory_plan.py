"""How many bytes each memory mode of the materializer needs, from tensor shapes alone, and which mode fits.

Shapes come from safetensors headers (`ModelShapes.from_folders`: no tensor is loaded) or from an
architecture's numbers (`ModelShapes.from_llama`, for sizes nobody has on disk: docs/scale.md). With
P merged parameters (a tied head counted once), N the largest tensor, K experts, b bytes per
checkpoint element and s bytes per stored element (b for bf16 / fp16, else 4: float32 task vectors),
one worker needs (`mode_needs`, each term named in `ModeNeed.terms`):

    every mode, device: live model P*b; float32 work buffer (K+1)*N*4 when s = 2; output buffer N*4
                        when b != 4; the method's workspace (below)
    resident,   device: base + experts (K+1)*P*s
    host,       host:   base + experts (K+1)*P*s (pinned on CUDA);   device: staging 2*(K+1)*N*s
    disk,       disk:   the cache (K+1)*P*s;   device: staging 2*(K+1)*N*s;   host: the mapped pages of
                        the block being copied (K+1)*N*s, and on CUDA pinned bounce buffers 2*(K+1)*N*s

    method workspace, device: DARE's draws K*N*4 (uncached); magnitude methods (ties, breadcrumbs):
    the order statistics kept per tensor and expert (4 bytes per grid point on the device, 12 on the
    host; whole small tensors) plus the first candidate's sorts, 28*N per sort running at once (on
    CUDA the host and disk modes sort a host copy: 32*N of host memory instead);
    DELLA and slerp (the unfused kernels): about 4*K*N*4 of temporaries (an estimate; linear is
    counted with its default normalize, a fused sum).

On CUDA the host also holds the live model once while it loads (P*b); the host figure is the larger
of that and what the mode keeps there. On CPU the device is host memory: a mode fits when device and
host bytes together fit in the host's free memory. A mode fits when its bytes are at most
`HEADROOM` of what is free; `choose_mode` takes the first that fits, in the order resident, host, disk.
Not counted: the scorer's activations, torch's own overhead, and DARE's optional draws cache
(`cache_random_draws`, K*P*4 bytes, only kept in the resident mode when it fits).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from evomerge.merge.methods import METHODS, method_row

if TYPE_CHECKING:
    import torch

    from evomerge.merge.checkpoint import ModelFolder

__all__ = ["HEADROOM", "MODES", "MemoryPlan", "MemoryPlanError", "ModeNeed", "ModelShapes", "choose_for_device",
           "choose_mode", "format_bytes", "free_memory", "mode_needs"]

MODES = ("resident", "host", "disk")
HEADROOM = 0.9  # a mode fits in at most this fraction of the free memory
DEFAULT_GRID = 1 << 16  # the materializer's DEFAULT_ORDER_STATS_GRID
GRID_SPACING = 256  # sparsify.GRID_SPACING
# Per entry of one order-statistics sort: |t| (4), sorted int32 keys and int64 indices (12), and the radix
# sort's second key and index buffers (12); a CPU sort of 28M entries measured 28.08 bytes per entry.
SORT_BYTES = 28


class MemoryPlanError(ValueError):
    """The models fit in no memory mode (or not in the one asked for); the message names the numbers."""


def format_bytes(n: float) -> str:
    """Decimal units, as `evomerge plan` prints them: 1.91 GB, 453.0 MB, 12.3 kB."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


@dataclass(frozen=True)
class ModelShapes:
    """What the plan needs of a model family: merged tensor sizes, bytes per element, number of experts."""

    numels: tuple[int, ...]  # per merged tensor (tied heads excluded)
    dtype_bytes: int  # of the checkpoint
    num_experts: int
    dtype_name: str = ""

    @property
    def parameters(self) -> int:
        return sum(self.numels)

    @property
    def max_numel(self) -> int:
        return max(self.numels)

    @property
    def stored_bytes(self) -> int:
        """Bytes per stored element: the checkpoint's when 16-bit, else float32 (see `tensor_store`)."""
        return 2 if self.dtype_bytes == 2 else 4

    @classmethod
    def from_folder(cls, base: "ModelFolder", num_experts: int) -> "ModelShapes":
        """From the base model's safetensors headers (shapes and dtype only; no tensor is read)."""
        names = base.tensor_names()
        numels = tuple(math.prod(base.shape(name)) for name in names)
        dtype = base.dtype(names[0])
        return cls(numels, dtype.itemsize, int(num_experts), str(dtype).removeprefix("torch."))

    @classmethod
    def from_folders(cls, base_dir: str | os.PathLike, expert_dirs: Sequence[str | os.PathLike], *,
                     allow_pickle: bool = False) -> "ModelShapes":
        from evomerge.merge.checkpoint import ModelFolder

        with ModelFolder.open(base_dir, allow_pickle=allow_pickle) as base:
            return cls.from_folder(base, len(expert_dirs))

    @classmethod
    def from_llama(cls, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                   tied: bool = False, head_dim: int | None = None, dtype_bytes: int = 2, num_experts: int = 3,
                   dtype_name: str = "bfloat16") -> "ModelShapes":
        """A Llama-architecture model's merged tensors from its config numbers (no files)."""
        head_dim = head_dim or hidden // heads
        per_layer = [heads * head_dim * hidden, kv_heads * head_dim * hidden, kv_heads * head_dim * hidden,
                     hidden * heads * head_dim, intermediate * hidden, intermediate * hidden, hidden * intermediate,
                     hidden, hidden]  # q, k, v, o, gate, up, down, two norms
        numels = [vocab * hidden] + per_layer * layers + [hidden] + ([] if tied else [vocab * hidden])
        return cls(tuple(numels), dtype_bytes, num_experts, dtype_name)


@dataclass(frozen=True)
class ModeNeed:
    """Bytes one worker needs in one mode; `terms` names each (label -> (where, bytes))."""

    mode: str
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    terms: Mapping[str, tuple[str, int]] = field(default_factory=dict)


def _order_stats_bytes(numels: Sequence[int], k: int, grid: int | None) -> tuple[int, int]:
    """(device, host) bytes of the order statistics of every tensor and expert (`MagnitudeOrderStats`)."""
    device = host = 0
    for n in numels:
        if grid is None or n <= grid:
            device += k * n * 4
        else:
            points = min(grid, max(2, n // GRID_SPACING))
            device += k * points * 4
            host += k * points * (12 if n < 2**31 else 24)
    return device, host


def _method_workspace(shapes: ModelShapes, method: str, grid: int | None, sort_workers: int,
                      sort_where: str = "device") -> dict[str, tuple[str, int]]:
    row = method_row(method)
    k, n = shapes.num_experts, shapes.max_numel
    terms: dict[str, tuple[str, int]] = {}
    if not row.fused and row.kernel != "linear":  # linear with its default normalize is one fused sum
        terms["kernel temporaries (estimate)"] = ("device", 4 * k * n * 4)
    if row.sparsifier == "random":
        terms["random draws"] = ("device", k * n * 4)
    if row.sparsifier in ("magnitude", "magnitude_outliers"):
        device, host = _order_stats_bytes(shapes.numels, k, grid)
        terms["order statistics"] = ("device", device)
        if host:
            terms["order statistics (ranks)"] = ("host", host)
        if sort_where == "device":
            sorts = min(k, max(1, sort_workers)) * n * SORT_BYTES
            terms["order-statistics sorts (first candidate)"] = ("device", sorts)
        else:  # a GPU's streaming modes sort a host copy of the task vector
            terms["order-statistics sorts on the host (first candidate)"] = (
                "host", min(k, max(1, sort_workers)) * n * (SORT_BYTES + 4))
    return terms


def mode_needs(shapes: ModelShapes, method: str | None = None, *, cuda: bool,
               order_stats_grid: int | None = DEFAULT_GRID, sort_workers: int = 1) -> dict[str, ModeNeed]:
    """{mode: ModeNeed} for one worker (the module docstring has the formula).

    `method` None: the most demanding merge method. `sort_workers`: order-statistics sorts running at
    once (the materializer's CPU pool: torch's thread count; 1 on CUDA)."""
    if method is None:
        candidates = [mode_needs(shapes, m, cuda=cuda, order_stats_grid=order_stats_grid, sort_workers=sort_workers)
                      for m in METHODS]
        return {mode: max((c[mode] for c in candidates), key=lambda need: (need.device_bytes, need.host_bytes))
                for mode in MODES}
    p, n, k, b, s = shapes.parameters, shapes.max_numel, shapes.num_experts, shapes.dtype_bytes, shapes.stored_bytes
    common: dict[str, tuple[str, int]] = {"live model": ("device", p * b)}
    if s == 2:
        common["float32 work buffer"] = ("device", (k + 1) * n * 4)
    if b != 4:
        common["output buffer"] = ("device", n * 4)
    stored = (k + 1) * p * s
    staging = 2 * (k + 1) * n * s
    per_mode = {
        "resident": {"base + experts": ("device", stored)},
        "host": {"base + experts": ("host", stored), "staging buffers": ("device", staging)},
        "disk": {"task-vector cache": ("disk", stored), "staging buffers": ("device", staging),
                 "cache pages in flight": ("host", (k + 1) * n * s),  # mapped while one block is copied
                 **({"bounce buffers": ("host", staging)} if cuda else {})},
    }
    needs = {}
    for mode in MODES:
        sort_where = "host" if cuda and mode != "resident" else "device"
        terms = {**per_mode[mode], **common,
                 **_method_workspace(shapes, method, order_stats_grid, sort_workers, sort_where)}
        total = {where: sum(v for w, v in terms.values() if w == where) for where in ("device", "host", "disk")}
        host = max(total["host"], p * b) if cuda else total["host"]  # CUDA: the model loads through host memory
        needs[mode] = ModeNeed(mode, total["device"], host, total["disk"], terms)
    return needs


def fits(need: ModeNeed, device_free: int, host_free: int, *, cpu: bool) -> bool:
    if cpu:  # one memory: the device is the host
        return need.device_bytes + need.host_bytes <= HEADROOM * host_free
    return need.device_bytes <= HEADROOM * device_free and need.host_bytes <= HEADROOM * host_free


@dataclass
class MemoryPlan:
    """The plan for one run or one worker: each mode's bytes, what is free per worker, and the mode chosen."""

    shapes: ModelShapes
    method: str | None
    device: str  # "cpu", "cuda", ...
    needs: dict[str, ModeNeed]
    device_free: int  # per worker
    host_free: int  # per worker
    requested: str = "auto"
    workers: int = 1
    chosen: str | None = None  # None: nothing fits (or the requested mode does not)
    remote: bool = False  # a cluster's workers: this machine's numbers are only a guide

    @property
    def cpu(self) -> bool:
        return self.device.split(":")[0] == "cpu"

    def fitting(self) -> list[str]:
        return [m for m in MODES if fits(self.needs[m], self.device_free, self.host_free, cpu=self.cpu)]

    def error(self) -> MemoryPlanError:
        """Why `chosen` is None, naming the numbers."""
        share = f" ({self.workers} workers share this machine)" if self.workers > 1 else ""
        free = (f"{format_bytes(self.host_free)} of host memory free per worker (on CPU the device is host memory)"
                if self.cpu else f"{format_bytes(self.device_free)} free on {self.device} and "
                f"{format_bytes(self.host_free)} of host memory free per worker")
        fitting = self.fitting()
        if self.requested != "auto":
            need = self.needs[self.requested]
            return MemoryPlanError(
                f"field `workers.memory`: mode {self.requested!r} needs {_need_text(need, self.cpu)} per worker but "
                f"{free}{share}, at most {HEADROOM:.0%} of it usable; "
                + (f"modes that fit: {', '.join(fitting)} (or auto)" if fitting else "no mode fits"))
        listed = "; ".join(f"{m} {_need_text(self.needs[m], self.cpu)}" for m in MODES)
        return MemoryPlanError(
            f"field `workers.memory`: these models fit in no memory mode: per worker {listed}; {free}{share}, at most "
            f"{HEADROOM:.0%} of it usable. Use fewer workers (`workers.num_workers`), a device with more memory, "
            "or free some")

    def format(self) -> str:
        """One short block: per worker, each mode's device / host bytes, what is free, the mode chosen."""
        s = self.shapes
        where = f"{self.device}, {self.workers} worker{'s' if self.workers > 1 else ''}"
        count = f"{s.parameters / 1e6:,.0f}M" if s.parameters >= 1e7 else f"{s.parameters:,}"
        lines = [f"memory plan per worker ({where}; {count} parameters, {s.dtype_name}, "
                 f"base + {s.num_experts} experts, method {self.method or 'any'}):"]
        fitting = set(self.fitting())
        for mode in MODES:
            need = self.needs[mode]
            disk = f"  disk {format_bytes(need.disk_bytes)} (one-time cache)" if need.disk_bytes else ""
            lines.append(f"  {mode:<9} device {format_bytes(need.device_bytes):>10}  host "
                         f"{format_bytes(need.host_bytes):>10}{disk}  {'fits' if mode in fitting else 'does not fit'}")
        cpu_note = " (on CPU the device is host memory)" if self.cpu else ""
        guide = "; the cluster's workers choose on their own machines" if self.remote else ""
        lines.append(f"  free per worker: device {format_bytes(self.device_free)}, host {format_bytes(self.host_free)}"
                     f"{cpu_note}{guide}")
        lines.append(f"  chosen: {self.chosen or 'none'} (workers.memory: {self.requested})")
        return "\n".join(lines)


def _need_text(need: ModeNeed, cpu: bool) -> str:
    if cpu:
        return f"{format_bytes(need.device_bytes + need.host_bytes)} of host memory"
    return f"device {format_bytes(need.device_bytes)} + host {format_bytes(need.host_bytes)}"


def choose_mode(plan: MemoryPlan) -> MemoryPlan:
    """Set `plan.chosen`: the requested mode if it fits, or for auto the first that fits; None otherwise."""
    fitting = plan.fitting()
    if plan.requested == "auto":
        plan.chosen = fitting[0] if fitting else None
    elif plan.requested in MODES:
        plan.chosen = plan.requested if plan.requested in fitting else None
    else:
        raise MemoryPlanError(f"field `workers.memory`: unknown mode {plan.requested!r}; use auto, "
                              f"{', '.join(MODES)}")
    return plan


# ----------------------------------------------------------------------------- free memory

def host_available() -> int:
    """Bytes of host memory available now (MemAvailable; 0 when unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def free_memory(device: "str | torch.device") -> int:
    """Bytes free on `device` now: CUDA's free memory, else the host's available memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available()


def choose_for_device(shapes: ModelShapes, method: str | None, device: "str | torch.device", *,
                      requested: str = "auto", host_share: float = 1.0, order_stats_grid: int | None = DEFAULT_GRID,
                      strict: bool = False) -> MemoryPlan:
    """The plan for one worker on `device` with what is free now; `host_share` of the host's memory is its own.

    `strict`: raise `MemoryPlanError` when nothing fits; otherwise an auto plan that fits nowhere takes
    `disk` (the smallest) and a named mode is kept (the caller asked for it)."""
    import torch

    device = torch.device(device)
    cpu = device.type == "cpu"
    workers = torch.get_num_threads() if cpu else 1
    host_free = int(host_available() * host_share)
    plan = MemoryPlan(shapes, method, str(device), mode_needs(shapes, method, cuda=device.type == "cuda",
                                                               order_stats_grid=order_stats_grid, sort_workers=workers),
                      device_free=host_free if cpu else free_memory(device), host_free=host_free,
                      requested=requested)
    choose_mode(plan)
    if plan.chosen is None:
        if strict:
            raise plan.error()
        plan.chosen = requested if requested in MODES else "disk"
    return plan


# ----------------------------------------------------------------------------- on paper (docs/scale.md)

SCALE_MODELS = {
    "7B (Llama-2-7B's shape)": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "70B (Llama-2-70B's shape)": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}
SCALE_DEVICES_GB = (24, 80, 141)


def scale_table(method: str = "ties", num_experts: int = 3) -> str:
    """docs/scale.md's tables: each mode's bytes for 7B and 70B models in bf16 with `num_experts` experts on
    one CUDA device, and which devices of `SCALE_DEVICES_GB` hold them, computed by `mode_needs`."""
    out = []
    for label, numbers in SCALE_MODELS.items():
        shapes = ModelShapes.from_llama(**numbers, num_experts=num_experts)
        needs = mode_needs(shapes, method, cuda=True)
        p, k = shapes.parameters, num_experts
        out.append(f"**{label}**: {p / 1e9:.2f}B merged parameters, bf16, base + {k} experts, method {method}, "
                   f"one worker on one CUDA device (a mode fits a device when its device bytes are at most "
                   f"{HEADROOM:.0%} of it).\n")
        out.append("| mode | device | host | disk | " + " | ".join(f"{g} GB device" for g in SCALE_DEVICES_GB) + " |")
        out.append("|---|---:|---:|---:|" + "---|" * len(SCALE_DEVICES_GB))
        legacy = p * shapes.dtype_bytes + (k + 1) * p * 4  # live model + float32 base and task vectors
        rows = [("before the modes (float32 resident)", legacy, p * shapes.dtype_bytes, 0)]
        rows += [(mode, needs[mode].device_bytes, needs[mode].host_bytes, needs[mode].disk_bytes) for mode in MODES]
        for name, device, host, disk in rows:
            verdicts = ["fits" if device <= HEADROOM * g * 1e9 else "no" for g in SCALE_DEVICES_GB]
            out.append(f"| {name} | {format_bytes(device)} | {format_bytes(host)} | "
                       f"{format_bytes(disk) if disk else '-'} | " + " | ".join(verdicts) + " |")
        chosen = []
        for g in SCALE_DEVICES_GB:
            first = next((m for m in MODES if needs[m].device_bytes <= HEADROOM * g * 1e9), None)
            chosen.append(f"{g} GB: {first or 'none'}"
                          + (f" (needs {format_bytes(needs[first].host_bytes)} of host memory)" if first else ""))
        out.append(f"\nauto, given the host memory each needs: {'; '.join(chosen)}.\n")
        terms = needs["host"].terms
        out.append("host mode, term by term: " + "; ".join(f"{name} {format_bytes(b)} ({where})"
                                                          for name, (where, b) in terms.items()) + ".\n")
    return "\n".join(out).rstrip() + "\n"
