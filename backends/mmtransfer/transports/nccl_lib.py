"""A small ctypes binding over ``libnccl.so.2``: the point-to-point subset this project uses.

Written in the style of vLLM's ``pynccl_wrapper.py``: the C prototypes are one table
(``FUNCTIONS``: name, return type, argument types), every call that returns an
``ncclResult_t`` goes through one checked path (``NCCLLibrary._call``), and a failure
raises ``NcclError`` carrying NCCL's own text from ``ncclGetErrorString``.

Which library (``find_library``), first match wins:
  1. ``$MM_NCCL_LIBRARY`` (a path or a soname); nothing else is tried when it is set;
  2. the NCCL that ships as a wheel next to torch: ``nvidia/nccl/lib/libnccl.so.2`` in any
     ``sys.path`` entry (nvidia-nccl-cu12 / -cu13; also ``nvidia/*/lib/``), then
     ``torch/lib/libnccl*.so*``, then a libnccl this process already loaded (torch's own);
  3. ``libnccl.so.2`` through the dynamic loader's search path.

No CUDA or torch import happens here: the table, the lookup and the error path are
testable on a machine without a GPU or NCCL.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

ENV_LIBRARY = "MM_NCCL_LIBRARY"
SONAME = "libnccl.so.2"

# ---- C types --------------------------------------------------------------------------------------
ncclResult_t = ctypes.c_int
ncclComm_t = ctypes.c_void_p
ncclDataType_t = ctypes.c_int
cudaStream_t = ctypes.c_void_p
buffer_type = ctypes.c_void_p

NCCL_UNIQUE_ID_BYTES = 128


class ncclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * NCCL_UNIQUE_ID_BYTES)]


# ncclDataType_t values (nccl.h); bytes go as ncclUint8: point-to-point needs no arithmetic.
NCCL_INT8 = 0
NCCL_UINT8 = 1
NCCL_FLOAT16 = 6
NCCL_FLOAT32 = 7
NCCL_BFLOAT16 = 9

# ncclResult_t values (nccl.h)
NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
RESULT_NAMES = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
}


@dataclass(frozen=True)
class Function:
    name: str
    restype: Any
    argtypes: Sequence[Any]
    optional: bool = False  # absent from older NCCL releases: bound when present


# The prototypes, as in nccl.h.
FUNCTIONS: tuple[Function, ...] = (
    # const char* ncclGetErrorString(ncclResult_t result);
    Function("ncclGetErrorString", ctypes.c_char_p, [ncclResult_t]),
    # ncclResult_t ncclGetVersion(int *version);
    Function("ncclGetVersion", ncclResult_t, [ctypes.POINTER(ctypes.c_int)]),
    # ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);
    Function("ncclGetUniqueId", ncclResult_t, [ctypes.POINTER(ncclUniqueId)]),
    # ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
    Function("ncclCommInitRank", ncclResult_t, [ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int]),
    # ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
    #                       ncclComm_t comm, cudaStream_t stream);
    Function(
        "ncclSend", ncclResult_t, [buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t]
    ),
    # ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer,
    #                       ncclComm_t comm, cudaStream_t stream);
    Function(
        "ncclRecv", ncclResult_t, [buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t]
    ),
    # ncclResult_t ncclGroupStart(); ncclResult_t ncclGroupEnd();
    Function("ncclGroupStart", ncclResult_t, []),
    Function("ncclGroupEnd", ncclResult_t, []),
    # ncclResult_t ncclCommDestroy(ncclComm_t comm); ncclResult_t ncclCommAbort(ncclComm_t comm);
    Function("ncclCommDestroy", ncclResult_t, [ncclComm_t]),
    Function("ncclCommAbort", ncclResult_t, [ncclComm_t]),
    # ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
    Function("ncclCommGetAsyncError", ncclResult_t, [ncclComm_t, ctypes.POINTER(ncclResult_t)]),
    # const char* ncclGetLastError(ncclComm_t comm);  (NCCL >= 2.13)
    Function("ncclGetLastError", ctypes.c_char_p, [ncclComm_t], optional=True),
)
REQUIRED = tuple(f.name for f in FUNCTIONS if not f.optional)


class NcclError(RuntimeError):
    """An NCCL call failed (``code`` is the ncclResult_t), or the library could not be used."""

    cause = "nccl"

    def __init__(self, message: str, code: int | None = None, function: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.function = function


class NcclUnavailable(NcclError):
    """No usable libnccl was found (the message lists where it looked)."""


def candidate_paths(env: dict[str, str] | None = None, search_path: Sequence[str] | None = None) -> list[str]:
    """Where ``find_library`` looks, in order (the env override alone when it is set)."""
    env = os.environ if env is None else env
    override = env.get(ENV_LIBRARY, "").strip()
    if override:
        return [override]
    out: list[str] = []
    entries = [e for e in (sys.path if search_path is None else search_path) if e and os.path.isdir(e)]
    for entry in entries:
        wheel = os.path.join(entry, "nvidia", "nccl", "lib", SONAME)
        if os.path.exists(wheel):
            out.append(wheel)
        out.extend(sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", SONAME))))
    for entry in entries:
        out.extend(sorted(glob.glob(os.path.join(entry, "torch", "lib", "libnccl*.so*"))))
    if search_path is None:
        out.extend(_loaded_nccl())
    out.append(SONAME)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _loaded_nccl() -> list[str]:
    """libnccl files already mapped into this process (torch loads its NCCL at import)."""
    try:
        with open("/proc/self/maps") as fh:
            return sorted({line.split()[-1] for line in fh if "libnccl" in line and line.split()[-1].startswith("/")})
    except OSError:
        return []


def find_library(
    env: dict[str, str] | None = None, search_path: Sequence[str] | None = None, loader=ctypes.CDLL
) -> tuple[str, Any]:
    """``(path, handle)`` of the first candidate that loads; NcclUnavailable names every one tried."""
    tried: list[str] = []
    for path in candidate_paths(env, search_path):
        try:
            return path, loader(path)
        except OSError as exc:
            tried.append(f"{path} ({exc})")
    source = f"${ENV_LIBRARY}" if (env if env is not None else os.environ).get(ENV_LIBRARY, "").strip() else "search"
    raise NcclUnavailable(
        f"NCCL library not found ({source}); tried: "
        + "; ".join(tried)
        + f". Install nvidia-nccl-cu12 (or a CUDA build of torch) or set {ENV_LIBRARY}=/path/to/libnccl.so.2"
    )


class NCCLLibrary:
    """The bound functions of one libnccl; thread-safe to call (NCCL is, per communicator)."""

    def __init__(self, path: str | None = None, *, handle: Any = None) -> None:
        if handle is None:
            if path is None:
                path, handle = find_library()
            else:
                try:
                    handle = ctypes.CDLL(path)
                except OSError as exc:
                    raise NcclUnavailable(f"cannot load NCCL from {path}: {exc}") from None
        self.path = path or "<handle>"
        self._funcs: dict[str, Any] = {}
        missing = []
        for fn in FUNCTIONS:
            try:
                f = getattr(handle, fn.name)
            except AttributeError:
                if not fn.optional:
                    missing.append(fn.name)
                continue
            f.restype = fn.restype
            f.argtypes = list(fn.argtypes)
            self._funcs[fn.name] = f
        if missing:
            raise NcclUnavailable(f"{self.path} lacks required NCCL functions: {', '.join(missing)}")

    # ---- the one checked error path ---------------------------------------------------------------
    def error_string(self, result: int) -> str:
        raw = self._funcs["ncclGetErrorString"](result)
        return raw.decode(errors="replace") if raw else RESULT_NAMES.get(result, f"ncclResult {result}")

    def _call(self, name: str, *args: Any) -> None:
        result = self._funcs[name](*args)
        if result != NCCL_SUCCESS:
            detail = ""
            comm = next((a for a in args if isinstance(a, ncclComm_t)), None)
            if comm is not None and "ncclGetLastError" in self._funcs:
                last = self._funcs["ncclGetLastError"](comm)
                if last:
                    detail = f" ({last.decode(errors='replace')})"
            raise NcclError(
                f"{name} failed: {RESULT_NAMES.get(result, result)}: {self.error_string(result)}{detail}",
                code=result,
                function=name,
            )

    # ---- API --------------------------------------------------------------------------------------
    def version(self) -> int:
        v = ctypes.c_int()
        self._call("ncclGetVersion", ctypes.byref(v))
        return v.value

    def version_string(self) -> str:
        v = self.version()
        if v >= 10000:  # NCCL >= 2.9 encodes major*10000 + minor*100 + patch
            return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
        return f"{v // 1000}.{v // 100 % 10}.{v % 100}"

    def get_unique_id(self) -> ncclUniqueId:
        uid = ncclUniqueId()
        self._call("ncclGetUniqueId", ctypes.byref(uid))
        return uid

    def comm_init_rank(self, nranks: int, uid: ncclUniqueId, rank: int) -> ncclComm_t:
        """Blocks until all ``nranks`` ranks called it with the same id (ctypes drops the GIL)."""
        comm = ncclComm_t()
        self._call("ncclCommInitRank", ctypes.byref(comm), nranks, uid, rank)
        return comm

    def send(self, ptr: int, nbytes: int, peer: int, comm: ncclComm_t, stream: int) -> None:
        self._call("ncclSend", buffer_type(ptr), nbytes, NCCL_UINT8, peer, comm, cudaStream_t(stream))

    def recv(self, ptr: int, nbytes: int, peer: int, comm: ncclComm_t, stream: int) -> None:
        self._call("ncclRecv", buffer_type(ptr), nbytes, NCCL_UINT8, peer, comm, cudaStream_t(stream))

    def group_start(self) -> None:
        self._call("ncclGroupStart")

    def group_end(self) -> None:
        self._call("ncclGroupEnd")

    def comm_destroy(self, comm: ncclComm_t) -> None:
        self._call("ncclCommDestroy", comm)

    def comm_abort(self, comm: ncclComm_t) -> None:
        self._call("ncclCommAbort", comm)

    def comm_async_error(self, comm: ncclComm_t) -> int:
        err = ncclResult_t()
        self._call("ncclCommGetAsyncError", comm, ctypes.byref(err))
        return err.value

    def check_async(self, comm: ncclComm_t) -> None:
        """Raise NcclError if the communicator reported an asynchronous failure."""
        err = self.comm_async_error(comm)
        if err not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            raise NcclError(
                f"communicator failed asynchronously: {RESULT_NAMES.get(err, err)}: {self.error_string(err)}",
                code=err,
                function="ncclCommGetAsyncError",
            )


def unique_id_to_hex(uid: ncclUniqueId) -> str:
    return bytes(ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)).hex()


def unique_id_from_hex(text: str) -> ncclUniqueId:
    raw = bytes.fromhex(text)
    if len(raw) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError(f"an ncclUniqueId is {NCCL_UNIQUE_ID_BYTES} bytes, got {len(raw)}")
    uid = ncclUniqueId()
    ctypes.memmove(ctypes.addressof(uid), raw, NCCL_UNIQUE_ID_BYTES)
    return uid


_LIB: NCCLLibrary | None = None
_LIB_ERROR: NcclError | None = None


def load() -> NCCLLibrary:
    """The process-wide library, loaded once; a failure is remembered and raised again."""
    global _LIB, _LIB_ERROR
    if _LIB is None:
        if _LIB_ERROR is not None:
            raise _LIB_ERROR
        try:
            _LIB = NCCLLibrary()
        except NcclError as exc:
            _LIB_ERROR = exc
            raise
    return _LIB
