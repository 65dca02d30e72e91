"""torch's intra-op threads in a stub (mm_triton.cpu_threads): set deliberately, so that several stubs on one
host do not each start a thread per core."""

from __future__ import annotations

import pytest
import torch

from mm_params import ParamError, Params
from mm_triton.cpu_threads import GPU_DEFAULT_THREADS, apply_torch_threads, cpu_cores, torch_threads_for


def test_policy():
    assert torch_threads_for(3, "cpu", 16) == 3 and torch_threads_for(3, "cuda:0", 16) == 3  # asked: exactly
    assert torch_threads_for(0, "cuda:1", 16) == GPU_DEFAULT_THREADS  # a GPU stub: few
    assert torch_threads_for(0, "cuda:0", 2) == 2 and torch_threads_for(0, "cuda:0", 1) == 1
    assert torch_threads_for(0, "cpu", 16) is None  # a CPU stub: torch's default (all cores)
    assert cpu_cores() >= 1


def test_apply_sets_the_pool_and_validates():
    before = torch.get_num_threads()
    try:
        assert apply_torch_threads(Params({"torch_threads": "1"}, {}), "cpu", "m_0") == 1
        assert torch.get_num_threads() == 1
        assert apply_torch_threads(Params({}, {"MM_TORCH_THREADS": "2"}), "cpu", "m_0") == 2
        for bad in ("-1", "1025", "many"):
            with pytest.raises(ParamError, match="torch_threads"):
                apply_torch_threads(Params({"torch_threads": bad}, {}), "cpu", "m_0")
    finally:
        torch.set_num_threads(before)


def test_only_the_models_running_torch_set_it():
    from mm_encoder.triton_model import EncoderModel
    from mm_remote.triton_model import RemotePipelineModel
    from mm_triton.engine_model import EngineModel
    from mm_triton.pipeline import PipelineModel

    assert EncoderModel.uses_torch and EngineModel.uses_torch
    assert not PipelineModel.uses_torch and not RemotePipelineModel.uses_torch  # they never import torch
