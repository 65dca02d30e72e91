"""The NCCL ctypes binding without a GPU: prototype table, library lookup, the checked error path.

A real libnccl is used only by the last test, which skips cleanly when none is found."""

from __future__ import annotations

import ctypes

import pytest

from mmtransfer import nccl_lib
from mmtransfer.transports.nccl_lib import FUNCTIONS, NcclError, NCCLLibrary, NcclUnavailable

NEEDED = {
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclSend",
    "ncclRecv",
    "ncclGroupStart",
    "ncclGroupEnd",
    "ncclCommDestroy",
    "ncclCommAbort",
    "ncclCommGetAsyncError",
    "ncclGetErrorString",
    "ncclGetVersion",
}


def test_table_holds_every_function_the_transport_needs():
    names = [f.name for f in FUNCTIONS]
    assert len(names) == len(set(names)), "a prototype appears twice"
    assert NEEDED <= set(nccl_lib.REQUIRED)
    for fn in FUNCTIONS:
        assert fn.restype is not None
        assert isinstance(list(fn.argtypes), list)
    by_name = {f.name: f for f in FUNCTIONS}
    assert len(by_name["ncclSend"].argtypes) == 6 and len(by_name["ncclRecv"].argtypes) == 6
    assert by_name["ncclCommInitRank"].argtypes[2] is nccl_lib.ncclUniqueId  # passed by value
    assert ctypes.sizeof(nccl_lib.ncclUniqueId) == 128


def test_unique_id_hex_round_trip():
    uid = nccl_lib.ncclUniqueId()
    for i in range(128):
        uid.internal[i] = (i * 37) % 256 - 128
    text = nccl_lib.unique_id_to_hex(uid)
    assert len(text) == 256
    back = nccl_lib.unique_id_from_hex(text)
    assert bytes(back.internal) == bytes(uid.internal)
    with pytest.raises(ValueError, match="128 bytes"):
        nccl_lib.unique_id_from_hex("ab" * 10)


# ---- library lookup --------------------------------------------------------------------------------
def test_env_override_is_the_only_candidate():
    assert nccl_lib.candidate_paths({"MM_NCCL_LIBRARY": "/opt/x/libnccl.so.2"}) == ["/opt/x/libnccl.so.2"]


def test_wheel_then_torch_then_soname(tmp_path):
    site = tmp_path / "site"
    (site / "nvidia" / "nccl" / "lib").mkdir(parents=True)
    (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_bytes(b"")
    (site / "torch" / "lib").mkdir(parents=True)
    (site / "torch" / "lib" / "libnccl.so.2").write_bytes(b"")
    paths = nccl_lib.candidate_paths({}, [str(site), str(tmp_path / "missing")])
    assert paths == [str(site / "nvidia/nccl/lib/libnccl.so.2"), str(site / "torch/lib/libnccl.so.2"), "libnccl.so.2"]


def test_not_found_message_names_every_place_tried_and_the_fix(tmp_path):
    def loader(path):
        raise OSError(f"{path}: cannot open shared object file")

    with pytest.raises(NcclUnavailable) as info:
        nccl_lib.find_library({}, [str(tmp_path)], loader=loader)
    text = str(info.value)
    assert "libnccl.so.2" in text and "MM_NCCL_LIBRARY" in text and "nvidia-nccl-cu12" in text

    with pytest.raises(NcclUnavailable, match=r"\$MM_NCCL_LIBRARY.*/nope/libnccl"):
        nccl_lib.find_library({"MM_NCCL_LIBRARY": "/nope/libnccl.so.2"}, [], loader=loader)


# ---- the checked error path with a stand-in library ---------------------------------------------
class _Fn:
    def __init__(self, impl):
        self.impl = impl
        self.restype = None
        self.argtypes = None

    def __call__(self, *args):
        return self.impl(*args)


class _FakeHandle:
    """Looks like a ctypes CDLL: attributes are callables with restype/argtypes."""

    def __init__(self, results: dict[str, int], missing=()):
        for fn in FUNCTIONS:
            if fn.name in missing:
                continue
            if fn.name == "ncclGetErrorString":
                setattr(self, fn.name, _Fn(lambda code: b"unhandled cuda error (run with NCCL_DEBUG=INFO for details)"))
            elif fn.name == "ncclGetLastError":
                setattr(self, fn.name, _Fn(lambda comm: b"Cuda failure 'invalid argument'"))
            else:
                setattr(self, fn.name, _Fn(lambda *a, _r=results.get(fn.name, 0): _r))


def test_failure_raises_ncclerror_with_nccls_text():
    lib = NCCLLibrary(handle=_FakeHandle({"ncclSend": 1}))
    with pytest.raises(NcclError) as info:
        lib.send(0x1000, 64, 1, nccl_lib.ncclComm_t(1), 0)
    exc = info.value
    assert exc.code == 1 and exc.function == "ncclSend"
    assert "ncclSend failed: ncclUnhandledCudaError: unhandled cuda error" in str(exc)
    assert "invalid argument" in str(exc)  # ncclGetLastError of the communicator, when present


def test_success_binds_prototypes_and_passes():
    handle = _FakeHandle({})
    lib = NCCLLibrary(handle=handle)
    lib.group_start()
    lib.recv(0x1000, 8, 0, nccl_lib.ncclComm_t(1), 0)
    lib.group_end()
    assert handle.ncclSend.argtypes == list({f.name: f for f in FUNCTIONS}["ncclSend"].argtypes)
    assert handle.ncclGetErrorString.restype is ctypes.c_char_p


def test_async_error_is_reported():
    handle = _FakeHandle({})

    def async_error(comm, out):
        out._obj.value = 6  # ncclRemoteError (out is ctypes.byref(result))
        return 0

    handle.ncclCommGetAsyncError = _Fn(async_error)
    lib = NCCLLibrary(handle=handle)
    with pytest.raises(NcclError, match="asynchronously: ncclRemoteError"):
        lib.check_async(nccl_lib.ncclComm_t(1))


def test_missing_required_function_is_named():
    with pytest.raises(NcclUnavailable, match="ncclRecv"):
        NCCLLibrary(handle=_FakeHandle({}, missing={"ncclRecv"}))
    NCCLLibrary(handle=_FakeHandle({}, missing={"ncclGetLastError"}))  # optional: fine


# ---- a real libnccl, when this machine has one ----------------------------------------------------
def test_real_library_loads_and_reports_its_version():
    try:
        path, handle = nccl_lib.find_library()
    except NcclUnavailable as exc:
        pytest.skip(f"no NCCL here: {str(exc)[:120]}")
    lib = NCCLLibrary(path, handle=handle)
    assert lib.version() > 0 and lib.version_string().count(".") == 2
    assert "success" in lib.error_string(0).lower()
