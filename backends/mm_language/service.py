"""The language service: pull every image's embedding, then generate; no Triton inside."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from mm_models.chat import ChatMessages
from mm_models.prompt import check_prompt
from mm_models.qwen2vl import EncodedImage, LanguageModel
from mmtransfer import (
    BlockPool, EmbedRef, ProtocolError, Receiver, TransferCancelled, TransferConfig, TransferObserver,
    TransferRecord,
)

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 32
MAX_IMAGES_PER_REQUEST = 16
# A prompt longer than this is refused before any transfer (the model's context bounds it anyway, but
# tokenizing megabytes of text first would cost the instance time).
DEFAULT_MAX_PROMPT_BYTES = 128 * 1024


@dataclass(frozen=True)
class GenerateOutput:
    text: str
    token_ids: list[int]
    transfers: list[TransferRecord]


class LanguageService:
    """Owns the language model, this instance's receive pool and its receiver."""

    def __init__(
        self,
        checkpoint: str | Path,
        config: TransferConfig,
        device: str = "cpu",
        observer: TransferObserver | None = None,
        name: str = "mm_language",
        max_tokens_limit: int = 1024,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    ) -> None:
        self.config = config
        self.max_prompt_bytes = max_prompt_bytes
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)
        self.lm = LanguageModel.from_pretrained(checkpoint, device=device)
        self.pool = BlockPool(
            config.pool_blocks, config.block_tokens, self.lm.hidden_size, self.lm.dtype, device,
            block_allocator=config.use_block_allocator, slot_blocks=min(config.window_blocks, config.pool_blocks),
            name=f"{name}-pool",
        )
        self.receiver = Receiver(self.pool, config, observer=observer, name=name)
        log.info("%s: checkpoint %s on %s, pool %d x %d tokens, window %d tokens", name, checkpoint, device,
                 config.pool_blocks, config.block_tokens, config.default_window_tokens)

    def check_request(self, refs: Sequence[bytes | str], prompt: str | ChatMessages,
                      max_tokens: int | None) -> tuple[list[EmbedRef], int]:
        """Validate everything before any transfer starts; ValueError names the bad input. ``prompt``
        is a plain PROMPT or a MESSAGES chat (already validated by mm_models.chat.parse_messages)."""
        if isinstance(prompt, ChatMessages):
            if prompt.text_bytes > self.max_prompt_bytes:
                raise ValueError(f"MESSAGES: longer than max_prompt_bytes={self.max_prompt_bytes} bytes of text")
            if prompt.num_images != len(refs):
                raise ValueError(f"MESSAGES: {prompt.num_images} image part(s) but {len(refs)} image(s) given")
        elif not prompt.strip():
            raise ValueError("PROMPT: must not be empty")
        elif len(prompt.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            raise ValueError(f"PROMPT: longer than max_prompt_bytes={self.max_prompt_bytes} bytes")
        else:
            try:
                check_prompt(prompt)
            except ValueError as exc:
                raise ValueError(f"PROMPT: {exc}") from None
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise ValueError(f"MAX_TOKENS: must be in [1, {self.max_tokens_limit}], got {max_tokens}")
        if len(refs) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"EMBED_REF: at most {MAX_IMAGES_PER_REQUEST} per request, got {len(refs)}")
        parsed = []
        for i, raw in enumerate(refs):
            try:
                parsed.append(EmbedRef.from_json(raw))
            except ProtocolError as exc:
                raise ValueError(f"EMBED_REF[{i}]: {exc}") from None
        return parsed, max_tokens

    def generate(
        self, refs: Sequence[bytes | str], prompt: str | ChatMessages, max_tokens: int | None = None,
        request_id: str = "",
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerateOutput:
        """Pull each referenced embedding in prompt order, then greedy-generate.

        If validation or a pull fails, the embeddings not pulled yet are aborted on
        their senders so no block waits for its TTL. ``cancelled`` (optional) is asked
        before every pull message and before generation: a cancelled request stops
        there (TransferCancelled), its remaining embeddings aborted and its window freed.
        """
        try:
            parsed, max_tokens = self.check_request(refs, prompt, max_tokens)
        except ValueError:
            self.abort_all(refs, "request rejected")
            raise
        images: list[EncodedImage] = []
        records: list[TransferRecord] = []
        for i, ref in enumerate(parsed):
            try:
                received = self.receiver.pull(ref, request_id, cancelled)
                grid = received.aux.extras.get("grid_thw")
                if not grid or len(grid) != 3:
                    raise ProtocolError(f"EMBED_REF[{i}]: the sender sent no grid_thw for the image")
            except BaseException:
                for rest in parsed[i + 1 :]:
                    self.receiver.abort(rest, "an earlier image of the request failed")
                raise
            images.append(EncodedImage(embeds=received.embedding, grid_thw=tuple(grid)))
            records.append(received.record)
        if cancelled is not None and cancelled():
            raise TransferCancelled(f"request {request_id or '-'} was cancelled before generation")
        token_ids = self.lm.generate(prompt, images, max_tokens)
        return GenerateOutput(self.lm.decode(token_ids), token_ids, records)

    def abort_all(self, refs: Sequence[bytes | str], reason: str) -> None:
        for raw in refs:
            try:
                self.receiver.abort(EmbedRef.from_json(raw), reason)
            except ProtocolError:
                pass

    def close(self) -> None:
        self.receiver.close()
