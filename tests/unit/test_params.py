"""mm_params (the one parameter resolver), ModelBase on top of it, and the README's configuration table
against the code's catalogue of parameters (mm_triton.knobs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mm_params import ParamError, Params, resolve_fields, tiny_model_dir
from mm_triton import knobs
from mm_triton.model_base import ModelBase

ROOT = Path(__file__).resolve().parents[2]


# ---- the resolver -------------------------------------------------------------------------------------
def test_environment_wins_and_empty_counts_as_unset():
    p = Params({"block_tokens": "64", "ttl_s": "5"}, env={"MM_BLOCK_TOKENS": "32", "MM_TTL_S": ""})
    assert p.int("block_tokens", 1) == 32
    assert p.float("ttl_s", 1.0) == 5.0
    assert p.int("pool_blocks", 7) == 7
    assert p.raw("missing") is None


@pytest.mark.parametrize("raw, value", [("1", True), ("YES", True), ("off", False), (" false ", False)])
def test_bools(raw, value):
    assert Params({"x": raw}, env={}).bool("x", not value) is value


def test_errors_name_where_the_value_came_from():
    with pytest.raises(ParamError, match=r"MM_POOL_BLOCKS \(environment\): cannot parse 'many' as int"):
        Params({"pool_blocks": "4"}, env={"MM_POOL_BLOCKS": "many"}).int("pool_blocks", 1)
    with pytest.raises(ParamError, match="parameter flag: cannot parse 'maybe' as bool"):
        Params({"flag": "maybe"}, env={}).bool("flag", False)
    with pytest.raises(ParamError, match=r"parameter n: -1 is outside \[0, 9\]"):
        Params({"n": "-1"}, env={}).int("n", 0, low=0, high=9)


def test_resolve_fields_parses_by_field_type_and_maps_names():
    from dataclasses import dataclass

    @dataclass
    class Knobs:
        slots: int = 1
        ratio: float = 0.5
        on: bool = False
        name: str = "x"

    p = Params({"max_slots": "3", "ratio": "0.25", "on": "true", "name": " y "}, env={})
    assert resolve_fields(Knobs, p) == {"ratio": 0.25, "on": True, "name": "y"}
    assert resolve_fields(Knobs, p, {"slots": "max_slots"}) == {"slots": 3}


def test_tiny_model_dir(tmp_path):
    assert tiny_model_dir({"MM_TINY_MODEL": str(tmp_path)}) == tmp_path
    assert tiny_model_dir({}) == ROOT / ".cache" / "models" / "tiny-qwen2-vl"


# ---- ModelBase ------------------------------------------------------------------------------------------
class _Probe(ModelBase):
    def setup(self) -> None:
        self.threads = self.int_param("encode_threads", 0)


def _args(params: dict[str, str]) -> dict[str, str]:
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    return {
        "model_config": json.dumps(config),
        "model_name": "probe",
        "model_instance_name": "probe_0",
        "model_repository": "/nonexistent/probe",
        "model_instance_kind": "CPU",
    }


def test_model_base_resolves_through_the_one_resolver(monkeypatch, tmp_path):
    monkeypatch.setenv("MM_ENCODE_THREADS", "3")
    monkeypatch.setenv("MM_BLOCK_TOKENS", "not-a-number")  # never read: this model asks for no transfer knobs
    model = _Probe()
    model.initialize(_args({"encode_threads": "1", "pool_blocks": "8"}))
    assert model.threads == 3 and model.device == "cpu"
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "preprocessor_config.json").write_text(  # Qwen2-VL's geometry: the budget resolves from it
        '{"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056}'
    )
    monkeypatch.setenv("MM_CHECKPOINT", str(tmp_path))
    assert model.checkpoint == tmp_path
    with pytest.raises(ValueError, match="MM_BLOCK_TOKENS"):
        _ = model.transfer_config
    monkeypatch.delenv("MM_BLOCK_TOKENS")
    model = _Probe()
    model.initialize(_args({"pool_blocks": "8"}))
    assert model.transfer_config.pool_blocks == 8
    assert model.transfer_config.max_embed_tokens == 16384  # 0 (auto) = what the processor allows


def test_remote_pipeline_is_a_model_base():
    from mm_remote.triton_model import RemotePipelineModel

    assert issubclass(RemotePipelineModel, ModelBase)
    assert "initialize" not in RemotePipelineModel.__dict__ and "execute" not in RemotePipelineModel.__dict__


# ---- the README's table against the code ------------------------------------------------------------
def _readme_parameters() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for name in re.findall(r"`([A-Za-z0-9_]+)`", first):
            if name.startswith("MM_"):
                assert name[3:].lower() in re.findall(r"`([a-z0-9_]+)`", first), f"{name} names no parameter"
            else:
                names.add(name)
    return names


def test_readme_documents_every_parameter_and_no_other():
    documented, code = _readme_parameters(), knobs.all_parameters()
    assert not code - documented, f"parameters missing from the README's configuration table: {code - documented}"
    assert not documented - code, f"README documents parameters no code reads: {documented - code}"


def test_every_repository_parameter_is_a_known_one():
    known = knobs.all_parameters()
    configs = [*ROOT.glob("model_repository/*/config.pbtxt"), *ROOT.glob("model_repositories/*/*/config.pbtxt")]
    assert len(configs) >= 5, "no repositories found: the glob is stale"
    for config in configs:
        blocks = re.findall(r"(?ms)^parameters \[(.*?)^\]", config.read_text())
        keys = {k for block in blocks for k in re.findall(r'key:\s*"([^"]+)"', block)}
        assert keys <= known, f"{config.relative_to(ROOT)}: unknown parameters {keys - known}"


_READS = re.compile(r'(?:int_param|resolver\.\w+|knobs\.(?:int|float|bool|str))\(\s*"([a-z0-9_]+)"')


def test_every_parameter_a_model_reads_is_catalogued():
    read = {m for path in (ROOT / "backends").rglob("*.py") for m in _READS.findall(path.read_text())}
    assert read, "the scan found no parameter reads: its pattern is stale"
    assert read <= knobs.all_parameters(), f"read but not in mm_triton.knobs: {read - knobs.all_parameters()}"
