"""A stand-in for `pycuda.driver` backed by host memory, as strict as a GPU about what code may do:

- device memory is allocations in an address space of their own; every access is bounds-checked against the
  allocation its address falls in, and an address in no allocation (or freed) is an error;
- `*_async` copies and kernel launches are queued on their stream and happen at `synchronize()`, in order: a
  host buffer read before its copy has run, or changed after it was queued, shows;
- `memset_d8` and `mem_alloc` are synchronous, as in CUDA;
- there are two GPUs, each with memory and streams of its own. Everything runs on the GPU of the context that
  is current (`Device(i).retain_primary_context().push()`; none current is an error): an allocation on the
  other GPU is an illegal address there, a stream of the other GPU an invalid handle. `memcpy_peer_async` is
  the one copy between them.
"""

from __future__ import annotations

import numpy as np


class SimulatedCudaError(RuntimeError):
    """What a real GPU would report as an illegal address or a failed launch."""


class GPU:
    """One simulated GPU: its memory and its streams (addresses of different GPUs never coincide)."""

    ALIGN = 256

    def __init__(self, index: int, total: int = 8 << 30):
        self.index = index
        self.total = total
        self.memory: dict[int, np.ndarray] = {}  # base address -> bytes
        self.streams: dict[int, Stream] = {}
        self._next = (index + 1) << 40

    def alloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise SimulatedCudaError(f"mem_alloc({nbytes}): a size must be positive")
        if nbytes > self.free():
            raise SimulatedCudaError(f"mem_alloc({nbytes}): out of memory")
        base = self._next
        self._next += (nbytes + self.ALIGN - 1) // self.ALIGN * self.ALIGN + self.ALIGN  # a gap between allocations
        self.memory[base] = np.zeros(nbytes, np.uint8)
        return base

    def free(self) -> int:
        return self.total - sum(a.size for a in self.memory.values())

    def view(self, address: int, nbytes: int) -> np.ndarray:
        """The `nbytes` at `address`, which must lie inside one live allocation."""
        address = int(address)
        for base, data in self.memory.items():
            if base <= address < base + data.size:
                if address + nbytes > base + data.size:
                    raise SimulatedCudaError(f"access of {nbytes} bytes at offset {address - base} overruns an "
                                             f"allocation of {data.size} bytes")
                return data[address - base:address - base + nbytes]
        raise SimulatedCudaError(f"address {address:#x} is in no allocation of GPU {self.index}")

    def allocation_of(self, address: int) -> tuple[int, int]:
        """(base, size) of the allocation holding `address`."""
        for base, data in self.memory.items():
            if base <= int(address) < base + data.size:
                return base, data.size
        raise SimulatedCudaError(f"address {int(address):#x} is in no allocation of GPU {self.index}")


GPUS = [GPU(0), GPU(1)]
DEVICE = GPUS[0]
_contexts: list[Context] = []  # the context stack of this (the only) thread
PEER_COPIES: list[tuple[int, int, int]] = []  # (from GPU, to GPU, bytes)


def current() -> GPU:
    if not _contexts:
        raise SimulatedCudaError("no CUDA context is current")
    return _contexts[-1].gpu


def init() -> None:
    pass


class Device:
    def __init__(self, ordinal: int):
        if not 0 <= ordinal < len(GPUS):
            raise SimulatedCudaError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")
        self.ordinal = ordinal

    @staticmethod
    def count() -> int:
        return len(GPUS)

    def retain_primary_context(self) -> Context:
        return Context(GPUS[self.ordinal])


class Context:
    def __init__(self, gpu: GPU):
        self.gpu = gpu

    def push(self) -> None:
        _contexts.append(self)

    @staticmethod
    def pop() -> None:
        if not _contexts:
            raise SimulatedCudaError("cuCtxPopCurrent: no context is current")
        _contexts.pop()


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.gpu = current()
        self.base = self.gpu.alloc(nbytes)

    def __int__(self) -> int:
        return self.base

    def __index__(self) -> int:
        return self.base

    def free(self) -> None:
        self.gpu.memory.pop(self.base, None)


class Stream:
    def __init__(self):
        self.handle = id(self)
        self.queue: list = []
        self.gpu = current()
        self.gpu.streams[self.handle] = self

    def enqueue(self, work) -> None:
        if current() is not self.gpu:
            raise SimulatedCudaError(f"a stream of GPU {self.gpu.index} used while GPU {current().index}'s context "
                                     "is current: invalid resource handle")
        self.queue.append(work)

    def synchronize(self) -> None:
        while self.queue:
            self.queue.pop(0)()


def _host_bytes(array: np.ndarray) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise SimulatedCudaError("a host buffer must be contiguous")
    return array.reshape(-1).view(np.uint8)


def mem_alloc(nbytes: int) -> DeviceAllocation:
    return DeviceAllocation(int(nbytes))


def mem_get_info() -> tuple[int, int]:
    gpu = current()
    return gpu.free(), gpu.total


def memcpy_htod_async(dst, src: np.ndarray, stream: Stream) -> None:
    gpu = stream.gpu

    def run():
        data = _host_bytes(src)
        gpu.view(int(dst), data.size)[:] = data

    gpu.view(int(dst), _host_bytes(src).size)  # the bounds are checked when the copy is queued, too
    stream.enqueue(run)


def memcpy_dtoh_async(dst: np.ndarray, src, stream: Stream) -> None:
    gpu = stream.gpu

    def run():
        data = _host_bytes(dst)
        data[:] = gpu.view(int(src), data.size)

    gpu.view(int(src), _host_bytes(dst).size)
    stream.enqueue(run)


def memcpy_dtod_async(dst, src, nbytes: int, stream: Stream) -> None:
    gpu = stream.gpu

    def run():
        gpu.view(int(dst), nbytes)[:] = gpu.view(int(src), nbytes).copy()

    gpu.view(int(dst), nbytes), gpu.view(int(src), nbytes)
    stream.enqueue(run)


def memcpy_peer_async(dest, src, size: int, dest_context: Context, src_context: Context, stream: Stream) -> None:
    """From `src` on the GPU of `src_context` to `dest` on the GPU of `dest_context`, in `stream`'s order."""
    to, source = dest_context.gpu, src_context.gpu

    def run():
        to.view(int(dest), size)[:] = source.view(int(src), size).copy()
        PEER_COPIES.append((source.index, to.index, size))

    to.view(int(dest), size), source.view(int(src), size)
    stream.enqueue(run)


def memset_d8(dst, value: int, nbytes: int) -> None:
    current().view(int(dst), nbytes)[:] = value


def pagelocked_empty(shape, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def stream_of(handle: int) -> Stream:
    gpu = current()
    if handle not in gpu.streams:
        raise SimulatedCudaError(f"no stream with handle {handle} on GPU {gpu.index}")
    return gpu.streams[handle]
