"""A stand-in for `pycuda.driver` backed by host memory, as strict as a GPU about what code may do:

- device memory is allocations in an address space of their own; every access is bounds-checked against the
  allocation its address falls in, and an address in no allocation (or freed) is an error;
- `*_async` copies and kernel launches are queued on their stream and happen at `synchronize()`, in order: a
  host buffer read before its copy has run, or changed after it was queued, shows;
- `memset_d8` and `mem_alloc` are synchronous, as in CUDA.
"""

from __future__ import annotations

import numpy as np


class SimulatedCudaError(RuntimeError):
    """What a real GPU would report as an illegal address or a failed launch."""


class Device:
    """The simulated GPU: its memory and its streams."""

    ALIGN = 256

    def __init__(self, total: int = 8 << 30):
        self.total = total
        self.memory: dict[int, np.ndarray] = {}  # base address -> bytes
        self.streams: dict[int, Stream] = {}
        self._next = 1 << 32

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
        raise SimulatedCudaError(f"address {address:#x} is in no allocation")

    def allocation_of(self, address: int) -> tuple[int, int]:
        """(base, size) of the allocation holding `address`."""
        for base, data in self.memory.items():
            if base <= int(address) < base + data.size:
                return base, data.size
        raise SimulatedCudaError(f"address {int(address):#x} is in no allocation")


DEVICE = Device()


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.base = DEVICE.alloc(nbytes)

    def __int__(self) -> int:
        return self.base

    def __index__(self) -> int:
        return self.base

    def free(self) -> None:
        DEVICE.memory.pop(self.base, None)


class Stream:
    def __init__(self):
        self.handle = id(self)
        self.queue: list = []
        DEVICE.streams[self.handle] = self

    def enqueue(self, work) -> None:
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
    return DEVICE.free(), DEVICE.total


def memcpy_htod_async(dst, src: np.ndarray, stream: Stream) -> None:
    def run():
        data = _host_bytes(src)
        DEVICE.view(int(dst), data.size)[:] = data

    DEVICE.view(int(dst), _host_bytes(src).size)  # the bounds are checked when the copy is queued, too
    stream.enqueue(run)


def memcpy_dtoh_async(dst: np.ndarray, src, stream: Stream) -> None:
    def run():
        data = _host_bytes(dst)
        data[:] = DEVICE.view(int(src), data.size)

    DEVICE.view(int(src), _host_bytes(dst).size)
    stream.enqueue(run)


def memcpy_dtod_async(dst, src, nbytes: int, stream: Stream) -> None:
    def run():
        DEVICE.view(int(dst), nbytes)[:] = DEVICE.view(int(src), nbytes).copy()

    DEVICE.view(int(dst), nbytes), DEVICE.view(int(src), nbytes)
    stream.enqueue(run)


def memset_d8(dst, value: int, nbytes: int) -> None:
    DEVICE.view(int(dst), nbytes)[:] = value


def pagelocked_empty(shape, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def stream_of(handle: int) -> Stream:
    if handle not in DEVICE.streams:
        raise SimulatedCudaError(f"no stream with handle {handle}")
    return DEVICE.streams[handle]
