"""Model repositories for each server role, generated from the committed ones (no copied configs).

    role       source repository                      models
    all        model_repository/                      mm_encoder, mm_language, mm_pipeline (ensemble), ...
    encoder    model_repositories/encoder_server/     mm_encoder
    language   model_repositories/language_server/    mm_language, mm_pipeline (BLS -> remote mm_encoder)

The sources serve as they are (``tritonserver --model-repository model_repositories/encoder_server``).
``build_repository`` writes a repository for other instance counts, GPUs or parameters: each model gets a
``config.pbtxt`` rewritten from its source (instance groups, parameters) and its version directory
``1`` as a symlink to the source's, so the model code is never duplicated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "all": ROOT / "model_repository",
    "encoder": ROOT / "model_repositories" / "encoder_server",
    "language": ROOT / "model_repositories" / "language_server",
}
ROLES = tuple(SOURCES)
ENCODER_MODEL, LANGUAGE_MODEL, PIPELINE_MODEL = "mm_encoder", "mm_language", "mm_pipeline"
MARKER = ".mm-generated"
MAX_INSTANCES = 64


def default_checkpoint() -> Path:
    from mm_params import tiny_model_dir

    return tiny_model_dir()


def source_repository(role: str) -> Path:
    if role not in SOURCES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return SOURCES[role]


def parse_gpus(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0,1"`` -> ``[0, 1]``; None/empty -> None (CPU instances)."""
    if text is None or text == "":
        return None
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    try:
        gpus = [int(g) for g in items if str(g) != ""]
    except ValueError:
        raise ValueError(f"GPU list {text!r}: expected comma-separated GPU indices like 0,1") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"GPU list {text!r}: expected distinct GPU indices >= 0")
    return gpus


def build_repository(
    dest: str | os.PathLike,
    role: str,
    *,
    encoder_instances: int | None = None,
    language_instances: int | None = None,
    pipeline_instances: int | None = None,
    encoder_gpus: Sequence[int] | None = None,
    language_gpus: Sequence[int] | None = None,
    parameters: Mapping[str, Mapping[str, str]] | None = None,
    checkpoint: str | os.PathLike | None = None,
    models: Iterable[str] | None = None,
) -> Path:
    """Write the repository of ``role`` into ``dest`` (replaced if it was generated before) and return it.

    encoder_instances / language_instances: instances of mm_encoder / mm_language, **per GPU** when
        encoder_gpus / language_gpus list GPUs (one instance group per GPU, KIND_GPU), else on the CPU.
        None keeps the source's instance groups.
    pipeline_instances: instances of the language server's BLS mm_pipeline (None: 2 x mm_language's).
    parameters: {model: {key: value}} set in the models' ``parameters``.
    checkpoint: written into empty ``checkpoint`` parameters (default: the tiny model), so the repository
        works without MM_CHECKPOINT wherever it lives.
    models: only these models of the source (default: all of them).
    """
    source = source_repository(role)
    dest = Path(dest)
    for name, value in (
        ("encoder_instances", encoder_instances),
        ("language_instances", language_instances),
        ("pipeline_instances", pipeline_instances),
    ):
        if value is not None and not 1 <= int(value) <= MAX_INSTANCES:
            raise ValueError(f"{name} must be in [1, {MAX_INSTANCES}], got {value}")
    chosen = _chosen_models(source, models)
    _fresh_destination(dest, source, role)
    ckpt = str(Path(checkpoint).expanduser().resolve()) if checkpoint else str(default_checkpoint())
    layout = {ENCODER_MODEL: (encoder_instances, encoder_gpus), LANGUAGE_MODEL: (language_instances, language_gpus)}
    language_count = None
    for name in chosen:
        config = _model_config(source / name, layout.get(name), ckpt, (parameters or {}).get(name) or {})
        if name == LANGUAGE_MODEL:
            language_count = sum(g.count * max(1, len(g.gpus)) for g in config.instance_group) or 1
        _write_model(dest / name, (source / name).resolve(), config, role)
    if role == "language" and PIPELINE_MODEL in chosen and config_is_python(dest / PIPELINE_MODEL):
        _rewrite_instances(dest / PIPELINE_MODEL / "config.pbtxt", pipeline_instances or 2 * (language_count or 1))
    return dest


def _chosen_models(source: Path, models: Iterable[str] | None) -> list[str]:
    available = sorted(p.name for p in source.iterdir() if (p / "config.pbtxt").is_file())
    chosen = list(models) if models is not None else available
    missing = [m for m in chosen if m not in available]
    if missing:
        raise ValueError(f"{source} has no model {', '.join(missing)} (it has {', '.join(available)})")
    return chosen


def _fresh_destination(dest: Path, source: Path, role: str) -> None:
    """An empty ``dest`` with the marker; only a repository generated before is replaced."""
    if dest.exists():
        if any(dest.iterdir()) and not (dest / MARKER).is_file():
            raise ValueError(f"{dest} exists and was not generated by build_repository: not replacing it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / MARKER).write_text(f"generated from {source} (role {role}); regenerated on every start\n")


def _model_config(
    src_dir: Path,
    layout: tuple[int | None, Sequence[int] | None] | None,
    checkpoint: str,
    parameters: Mapping[str, str],
):
    """The source's config with the instance layout (instances, gpus), the checkpoint and ``parameters`` set."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((src_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    if layout is not None and (layout[0] is not None or layout[1]):
        _set_instances(config, layout[0] or 1, layout[1])
    if "checkpoint" in config.parameters and not config.parameters["checkpoint"].string_value:
        config.parameters["checkpoint"].string_value = checkpoint
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def _write_model(model_dir: Path, src_dir: Path, config, role: str) -> None:
    """config.pbtxt written, the code (version 1) a symlink to the source's."""
    from google.protobuf import text_format

    model_dir.mkdir()
    (model_dir / "1").symlink_to(src_dir / "1", target_is_directory=True)
    (model_dir / "config.pbtxt").write_text(
        f"# Generated from {src_dir / 'config.pbtxt'} (role {role}); edit that file, not this one.\n"
        + text_format.MessageToString(config)
    )


def _rewrite_instances(path: Path, count: int) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    _set_instances(config, count, None)
    header = path.read_text().splitlines()[0] + "\n"
    path.write_text(header + text_format.MessageToString(config))


def config_is_python(model_dir: Path) -> bool:
    return 'backend: "python"' in (model_dir / "config.pbtxt").read_text()


def _set_instances(config, count: int, gpus: Sequence[int] | None) -> None:
    from tritonclient.grpc import model_config_pb2

    del config.instance_group[:]
    if gpus:
        for gpu in gpus:  # one group per GPU: instance names stay unique (<model>_<group>_<i>)
            config.instance_group.add(
                count=int(count), kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, gpus=[int(gpu)]
            )
    else:
        config.instance_group.add(count=int(count), kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)


def instance_count(repo: str | os.PathLike, model: str) -> int:
    """Instances a repository's model will have (sum over its instance groups and their GPUs)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((Path(repo) / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return sum(g.count * max(1, len(g.gpus)) for g in config.instance_group) or 1
