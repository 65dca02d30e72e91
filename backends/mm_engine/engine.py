"""LLMEngine: one loop thread per model instance doing iteration-level (continuous) batching.

Each iteration of the loop, between forwards:
  1. take new submits and landed image loads; end sequences that were cancelled, passed their
     deadline or waited longer than ``max_queue_delay_s`` (their slot, if any, is freed at once);
  2. prefill: up to ``max_num_batched_tokens`` prompt tokens of joining sequences (one at a time, in
     arrival order, chunked when longer), each finished prefill samples the sequence's first token and
     moves it into the decoding group;
  3. decode: one forward for all decoding sequences, one token each, per-sequence sampling;
  4. report: ``on_tokens`` per new token, ``on_finish`` / ``on_error`` and the slot freed when one ends.
A prefill chunk is the longest time a running decode waits for (see docs for the measured bound).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from .api import (
    Engine,
    EngineError,
    ErrorCause,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    ResponseSink,
)
from .config import EngineConfig
from .detok import IncrementalDetokenizer
from .endings import checkpoint_eos_ids, end_message, probe_end, step_failed
from .runner import ModelRunner
from .sampling import make_generator, sample
from .scheduler import Drained, Intake, Landed, WaitQueue
from .sequence import SeqState, Sequence
from .slots import Move, SlotTable
from .stats import EngineObserver, EngineStats, StepCounters
from .validate import ModelLimits, check_images, check_request

log = logging.getLogger(__name__)

#: Longest sleep of a loop whose sequences are all loading: their cancellation and deadlines are polled this
#: often. A loop with no sequence at all sleeps until a submit (or close) wakes it: no polling while idle.
IDLE_POLL_S = 0.02


class LLMEngine(Engine):
    """The :class:`~mm_engine.api.Engine` over a Qwen2-VL HF model (full or language-only) and its tokenizer."""

    def __init__(
        self,
        hf_model: Any,
        tokenizer: Any,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        eos_token_ids: set[int] | None = None,
    ) -> None:
        max_pos = int(hf_model.config.text_config.max_position_embeddings)
        if config.max_seq_len > max_pos:
            raise ValueError(
                f"engine config: max_seq_len {config.max_seq_len} exceeds the model's context of {max_pos} tokens"
            )
        self.config = config
        self._tokenizer = tokenizer
        self._runner = ModelRunner(hf_model, config.max_batch_size, config.max_seq_len)
        self._limits = ModelLimits(
            vocab_size=self._runner.vocab_size,
            image_token_id=self._runner.image_token_id,
            hidden_size=self._runner.hidden_size,
            merge_size=int(hf_model.config.vision_config.spatial_merge_size),
            max_seq_len=config.max_seq_len,
        )
        self._eos = set(eos_token_ids) if eos_token_ids is not None else checkpoint_eos_ids(hf_model)
        self._observer = observer or EngineObserver()
        self._counters = StepCounters()
        self._slots = SlotTable(config.max_batch_size)
        self._by_row: dict[str, Sequence] = {}  # id -> sequence holding a slot
        self._queue = WaitQueue()
        self._prefilling: Sequence | None = None
        self._intake = Intake(config.max_queue_size, config.loader_threads)
        self._thread = threading.Thread(target=self._run, name="mm-engine-loop", daemon=True)
        self._thread.start()
        log.info(
            "engine started: %d slots x %d tokens (%.1f MiB KV, %s), %d prefill tokens per step",
            config.max_batch_size,
            config.max_seq_len,
            self._runner.cache.nbytes / 2**20,
            self._runner.dtype,
            config.max_num_batched_tokens,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: EngineConfig, part: str = "language", observer: EngineObserver | None = None
    ) -> LLMEngine:
        """Load ``part`` ("language", or "full" to share the model with a VisionEncoder) of a local
        checkpoint on ``config.device`` in ``config.dtype`` and start an engine over it."""
        from mm_models.qwen2vl import _loading

        dtype = None if config.dtype == "auto" else config.dtype
        model = _loading.load_model(path, part, device=config.device, dtype=dtype)
        return cls(model, _loading.load_tokenizer(path), config, observer=observer)

    # ------------------------------------------------------------------ public API
    def submit(self, request: GenerationRequest, sink: ResponseSink) -> None:
        check_request(request, self._limits)
        seq = Sequence(
            request=request,
            sink=sink,
            arrival=time.monotonic(),
            detok=IncrementalDetokenizer(self._tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling),
        )
        self._intake.offer(seq)
        log.debug(
            "request %s admitted: %d prompt tokens, %d images",
            request.request_id,
            len(request.prompt_ids),
            len(request.image_token_counts),
        )

    def close(self, timeout_s: float = 30.0) -> None:
        self._intake.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def stats(self) -> EngineStats:
        return self._counters.snapshot(
            running=self._slots.used, waiting=self._intake.waiting, slots_total=self._slots.capacity
        )

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                busy = bool(self._slots.used or self._queue.has_ready())
                drained = self._intake.take(0 if busy else IDLE_POLL_S if len(self._queue) else None)
                if drained.closing:
                    break
                self._observer.on_loop_work(True)
                try:
                    self._iterate(drained)
                finally:
                    self._observer.on_loop_work(False)
        except BaseException:  # a bug: fail every sequence rather than hang them
            log.exception("engine loop crashed")
            self._fail_all(ErrorCause.INTERNAL, "the language engine loop crashed")
        finally:
            self._shutdown()

    def _iterate(self, drained: Drained) -> None:
        for seq in drained.new:
            self._enqueue(seq)
        for landed in drained.landed:
            self._land(landed)
        self._expire(time.monotonic())
        self._step()
        self._report_gauges()

    def _enqueue(self, seq: Sequence) -> None:
        self._queue.add(seq)
        if seq.request.image_token_counts:
            seq.state = SeqState.LOADING
            self._intake.start_load(seq)
        else:
            seq.images = []
            seq.state = SeqState.READY

    def _land(self, landed: Landed) -> None:
        seq = landed.seq
        if seq.state is not SeqState.LOADING:
            return  # ended while loading; the loader was aborted then
        if landed.error is not None:
            cause = probe_end(seq, time.monotonic())
            if cause is not None:  # the loader gave up because the request was cancelled / timed out
                self._end_error(seq, EngineError(cause, end_message(cause, seq.id, 0)))
                return
            err = EngineError(ErrorCause.IMAGE_LOAD, f"request {seq.id}: loading its images failed: {landed.error}")
            err.__cause__ = landed.error
            self._end_error(seq, err)
            return
        try:
            seq.images = check_images(seq.request, landed.images, self._limits)
        except EngineError as e:
            self._end_error(seq, e)
            return
        seq.state = SeqState.READY

    def _expire(self, now: float) -> None:
        """End cancelled / past-deadline sequences, and waiting ones past max_queue_delay_s."""
        delay = self.config.max_queue_delay_s
        for seq in list(self._queue) + list(self._by_row.values()):
            cause = probe_end(seq, now)
            if cause is None and delay and not seq.holds_slot and now - seq.arrival > delay:
                cause = ErrorCause.QUEUE_TIMEOUT
            if cause is not None:
                self._end_error(seq, EngineError(cause, end_message(cause, seq.id, delay)))

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        budget = self.config.max_num_batched_tokens
        while budget > 0:
            seq = self._prefilling or self._admit_next()
            if seq is None:
                break
            budget -= self._prefill_chunk(seq, budget)
            if self._prefilling is not None:
                break  # budget spent mid-prompt: continue it next step
        if self._slots.decoding:
            self._decode()
        self._counters.steps += 1

    def _admit_next(self) -> Sequence | None:
        if not self._slots.free:
            return None
        seq = self._queue.next_ready()
        if seq is None:
            return None
        try:
            seq.prompt = self._runner.prepare(seq.request.prompt_ids, seq.images or [])
            seq.rope_delta = seq.prompt.rope_delta
        except (ValueError, RuntimeError) as e:
            self._end_error(seq, EngineError(ErrorCause.INVALID, f"request {seq.id}: {e}"))
            return None
        self._queue.remove(seq)
        self._intake.left_queue()
        self._slots.acquire(seq.id)
        seq.timing.admitted = time.monotonic()  # type: ignore[union-attr]
        self._by_row[seq.id] = seq
        seq.state = SeqState.PREFILLING
        seq.images = None  # the rows are in prompt.embeds now
        self._prefilling = seq
        return seq

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Prefill up to ``budget`` more prompt tokens of ``seq``; returns how many."""
        assert seq.prompt is not None  # set by _admit_next (an invariant, not request data)
        start = seq.prefilled
        end = min(seq.prompt.length, start + budget)
        try:
            logits = self._runner.prefill(self._slots.row(seq.id), seq.prompt, start, end)
        except Exception as e:  # noqa: BLE001 - a device error fails this sequence only
            log.exception("prefill of %s failed", seq.id)
            self._end_error(seq, step_failed(seq.id, e))
            return end - start
        seq.prefilled = end
        self._counters.add_prompt(end - start, self._observer)
        if logits is None:
            return end - start
        self._prefilling = None
        moves = self._slots.promote(seq.id)
        self._apply_moves(moves)
        seq.state = SeqState.RUNNING
        seq.prompt = None
        token = sample(logits.unsqueeze(0), [seq.request.sampling], [seq.generator])[0]
        self._counters.add_generated(1, self._observer)
        self._append(seq, token, time.monotonic())
        return end - start

    def _decode(self) -> None:
        rows = [self._by_row[owner] for owner in self._slots.owners()[: self._slots.decoding]]  # type: ignore[index]
        tokens = [s.output[-1] for s in rows]
        lens = [s.cached_len for s in rows]
        deltas = [s.rope_delta for s in rows]
        try:
            logits = self._runner.decode(tokens, lens, deltas)
            new = sample(logits, [s.request.sampling for s in rows], [s.generator for s in rows])
        except Exception as e:  # noqa: BLE001 - the batch's cache state is unknown: fail the batch
            log.exception("decode step of %d sequences failed", len(rows))
            for s in rows:
                self._end_error(s, step_failed(s.id, e))
            return
        now = time.monotonic()
        self._counters.add_generated(len(new), self._observer)
        for seq, token in zip(rows, new, strict=True):
            self._append(seq, token, now)

    # ------------------------------------------------------------------ tokens and endings
    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.output.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
            seq.timing.first_token = now  # type: ignore[union-attr]
            _safe(self._observer.on_time_to_first_token, now - seq.arrival)
        else:
            _safe(self._observer.on_inter_token_latency, now - (seq.last_token_at or now))
        seq.last_token_at = now
        reason = None
        if token in self._eos and not seq.request.sampling.ignore_eos:
            reason = FinishReason.STOP
            delta = seq.detok.flush()
        else:
            delta = seq.detok.add(token)
            if seq.detok.stopped:
                reason = FinishReason.STOP
        if reason is None and len(seq.output) >= seq.request.sampling.max_tokens:
            reason = FinishReason.LENGTH
            delta += seq.detok.flush()
        if seq.detok.stopped:
            if delta:  # text before the stop string; the token that completed it is not streamed
                _safe(seq.sink.on_tokens, [], delta)
        else:
            _safe(seq.sink.on_tokens, [token], delta)
        if reason is not None:
            self._end_ok(seq, reason)

    def _end_ok(self, seq: Sequence, reason: FinishReason) -> None:
        out = GenerationOutput(
            request_id=seq.id,
            token_ids=list(seq.output),
            text=seq.detok.text,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output),
            image_tokens=tuple(int(n) for n in seq.request.image_token_counts),
        )
        self._release(seq)
        self._counters.finished(reason.value, self._observer)
        seq.timing.finished = seq.last_token_at  # type: ignore[union-attr]
        _safe(self._observer.on_sequence_timing, seq.timing)
        log.debug("request %s finished (%s): %d tokens", seq.id, reason.value, len(seq.output))
        _safe(seq.sink.on_finish, out)

    def _end_error(self, seq: Sequence, error: EngineError) -> None:
        if seq.state is SeqState.DONE:
            return
        if seq.state is SeqState.LOADING and seq.request.images is not None:
            _safe(seq.request.images.abort, error.cause.value)
        self._release(seq)
        self._counters.finished(error.cause.value, self._observer)
        log.info("request %s ended: %s: %s", seq.id, error.cause.value, error)
        _safe(seq.sink.on_error, error)

    def _release(self, seq: Sequence) -> None:
        """Free what ``seq`` holds (slot or queue place); it becomes DONE."""
        if seq.holds_slot:
            if self._prefilling is seq:
                self._prefilling = None
            self._apply_moves(self._slots.release(seq.id))
            del self._by_row[seq.id]
        elif seq.state is not SeqState.DONE:
            self._queue.remove(seq)
            self._intake.left_queue()
        seq.state = SeqState.DONE
        seq.prompt = None
        seq.images = None
        seq.ended.set()

    def _apply_moves(self, moves: list[Move]) -> None:
        # +1: mid-step, a row may already hold this step's token before its sequence appended it
        cap = self.config.max_seq_len
        for m in moves:
            length = self._by_row[m.owner].cached_len + 1
            if m.swap:
                other = self._by_row[self._slots.owners()[m.src]]  # type: ignore[index]
                self._runner.swap_rows(m.src, m.dst, min(cap, max(length, other.cached_len + 1)))
            else:
                self._runner.move_row(m.src, m.dst, min(cap, length))

    # ------------------------------------------------------------------ shutdown
    def _fail_all(self, cause: ErrorCause, message: str) -> None:
        for seq in list(self._by_row.values()) + list(self._queue):
            try:
                self._end_error(seq, EngineError(cause, f"request {seq.id}: {message}"))
            except Exception:  # noqa: BLE001 - keep failing the others
                log.exception("failing %s", seq.id)

    def _shutdown(self) -> None:
        self._intake.close()
        drained = self._intake.take(0)
        for seq in drained.new:
            self._queue.add(seq)
            seq.state = SeqState.LOADING if seq.request.image_token_counts else SeqState.READY
        self._fail_all(ErrorCause.SHUTDOWN, "the language engine is shutting down")
        self._intake.shutdown_pool()
        self._report_gauges()
        log.info("engine stopped")

    def _report_gauges(self) -> None:
        _safe(self._observer.on_gauges, self._slots.used, self._intake.waiting, self._slots.used, self._slots.capacity)


def _safe(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - sinks and observers must not break the loop
        log.exception("%s raised", getattr(fn, "__qualname__", fn))
