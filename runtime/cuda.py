"""The few CUDA calls a TensorRT engine run needs, through the driver library the NVIDIA driver installs.

TensorRT's Python API takes device pointers and a stream; it does not allocate them. The driver API
(``libcuda.so.1``) is present wherever an NVIDIA driver is, so no CUDA Python package is needed, and
its primary context is the one TensorRT's runtime API uses::

    cuda = CudaDevice()                  # KilnError with the fix when there is no driver or no GPU
    cuda.name(), cuda.compute_capability()   # "NVIDIA H200", "9.0"
    pointer = cuda.alloc(array.nbytes); cuda.to_device(pointer, array, stream); cuda.synchronize(stream)
"""

from __future__ import annotations

import ctypes

import numpy as np

from modelkiln.errors import KilnError

DRIVER_LIBRARY = "libcuda.so.1"
_COMPUTE_CAPABILITY = (75, 76)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, _MINOR
NO_GPU_FIX = "TensorRT engines build and run on an NVIDIA GPU: run this on a machine with one and its driver"


def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL(DRIVER_LIBRARY)
    except OSError as error:
        raise KilnError(f"no NVIDIA driver here ({DRIVER_LIBRARY}: {error}). {NO_GPU_FIX}.") from None


class CudaDevice:
    """One CUDA device with its primary context current on this thread."""

    def __init__(self, ordinal: int = 0):
        self.lib = _driver()
        self._check(self.lib.cuInit(0), "cuInit")
        count = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value <= ordinal:
            raise KilnError(f"CUDA device {ordinal} does not exist ({count.value} devices). {NO_GPU_FIX}.")
        self.device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(self.device), ordinal), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device), "context")
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(code, ctypes.byref(name))
            raise KilnError(
                f"CUDA {call} failed with {(name.value or b'error %d' % code).decode()}. {NO_GPU_FIX}."
            )

    def name(self) -> str:
        buffer = ctypes.create_string_buffer(256)
        self._check(self.lib.cuDeviceGetName(buffer, 256, self.device), "cuDeviceGetName")
        return buffer.value.decode()

    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        for value, attribute in zip((major, minor), _COMPUTE_CAPABILITY, strict=True):
            self._check(
                self.lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, self.device), "attribute"
            )
        return f"{major.value}.{minor.value}"

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        # At least one byte: an empty tensor (a first step's empty KV cache) still needs an address.
        self._check(
            self.lib.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc"
        )
        return pointer.value

    def free(self, pointer: int) -> None:
        self._check(self.lib.cuMemFree_v2(ctypes.c_uint64(pointer)), "cuMemFree")

    def stream(self) -> int:
        stream = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(stream), 0), "cuStreamCreate")
        return stream.value or 0

    def to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        source, size = array.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(array.nbytes)
        code = self.lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(pointer), source, size, ctypes.c_void_p(stream))
        self._check(code, "cuMemcpyHtoDAsync")

    def to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        target, size = array.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(array.nbytes)
        code = self.lib.cuMemcpyDtoHAsync_v2(target, ctypes.c_uint64(pointer), size, ctypes.c_void_p(stream))
        self._check(code, "cuMemcpyDtoHAsync")

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")
