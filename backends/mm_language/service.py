"""The language service: this instance's receive pool, receiver and language engine; no Triton inside.

A request becomes a :class:`~mm_engine.api.GenerationRequest` whose :class:`~.loader.PullLoader` pulls the
EMBED_REFs on an engine loader thread; the engine batches it with the others between decode steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from mm_engine.api import GenerationRequest, SamplingParams
from mm_engine.stats import EngineObserver
from mm_models.chat import ChatMessages
from mm_models.qwen2vl import LanguageModel
from mmtransfer import BlockPool, EmbedRef, ProtocolError, Receiver, TransferConfig, TransferObserver

from .engine_factory import engine_config, make_engine, model_dtype, warn_if_an_image_cannot_fit
from .loader import PullLoader

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16


class LanguageService:
    """Owns the language model (inside the engine), this instance's receive pool and its receiver."""

    def __init__(
        self,
        checkpoint: str | Path,
        config: TransferConfig,
        engine_params: Mapping[str, str],
        device: str = "cpu",
        observer: TransferObserver | None = None,
        name: str = "mm_language",
        engine_observer: EngineObserver | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.engine_config = engine_config(engine_params, device)
        warn_if_an_image_cannot_fit(self.engine_config, config.max_embed_tokens, name)
        self.lm = LanguageModel.from_pretrained(checkpoint, device=device, dtype=model_dtype(self.engine_config))
        self.pool = BlockPool(
            config.pool_blocks,
            config.block_tokens,
            self.lm.hidden_size,
            self.lm.dtype,
            device,
            block_allocator=config.use_block_allocator,
            slot_blocks=min(config.window_blocks, config.pool_blocks),
            name=f"{name}-pool",
        )
        self.receiver = Receiver(self.pool, config, observer=observer, name=name)
        self.engine = make_engine(self.lm.hf_model, self.lm.tokenizer, self.engine_config, engine_observer)
        log.info(
            "%s: checkpoint %s on %s, pool %d x %d tokens, window %d tokens",
            name,
            checkpoint,
            device,
            config.pool_blocks,
            config.block_tokens,
            config.default_window_tokens,
        )

    def parse_refs(self, raw: Sequence[bytes | str]) -> list[EmbedRef]:
        """Validate every EMBED_REF before anything is pulled; ValueError names the bad one."""
        if len(raw) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"EMBED_REF: at most {MAX_IMAGES_PER_REQUEST} per request, got {len(raw)}")
        refs = []
        for i, item in enumerate(raw):
            try:
                ref = EmbedRef.from_json(item)
            except ProtocolError as exc:
                raise ValueError(f"EMBED_REF[{i}]: {exc}") from None
            if not 1 <= ref.num_tokens <= self.config.max_embed_tokens:
                # the engine lays out the prompt (and reserves its KV room) before the pull: it needs the length
                raise ValueError(
                    f"EMBED_REF[{i}]: num_tokens must be in [1, max_embed_tokens="
                    f"{self.config.max_embed_tokens}], got {ref.num_tokens}"
                )
            refs.append(ref)
        return refs

    def build_request(
        self,
        request_id: str,
        raw_refs: Sequence[bytes | str],
        prompt: str | ChatMessages,
        sampling: SamplingParams,
        deadline: float | None,
    ) -> GenerationRequest:
        """The engine's request for validated inputs; the prompt's image pad runs take each ref's length."""
        refs = self.parse_refs(raw_refs)
        counts = [ref.num_tokens for ref in refs]
        prompt_ids = self.lm.build_input_ids(prompt, counts)
        loader = PullLoader(self.receiver, refs, request_id) if refs else None
        return GenerationRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            image_token_counts=counts,
            images=loader,
            sampling=sampling,
            deadline=deadline,
        )

    def abort_all(self, raw_refs: Sequence[bytes | str], reason: str) -> None:
        for raw in raw_refs:
            try:
                self.receiver.abort(EmbedRef.from_json(raw), reason)
            except Exception:  # noqa: BLE001 - best effort; the sender's TTL is the backstop
                pass

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            self.receiver.close()
