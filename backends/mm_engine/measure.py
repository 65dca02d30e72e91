"""Engine measurements, in process: decode step time vs batch size, the stall a joining prefill imposes
on running decodes for a given chunk bound, and exactness (batch 1 vs HF ``generate``; batched vs
batch 1 with the near-tie rule). Not a test: figures for the docs and the GPU check.

    python -m mm_engine.measure --model .cache/models/tiny-qwen2-vl --json out.json
    python -m mm_engine.measure --model qwen2-vl-2b-random --device cuda --dtype bfloat16 --exact 8

``--model qwen2-vl-2b-random`` builds the 2B-size language model with random weights in memory on the
device (seconds; no checkpoint written; a 1-block vision tower, unused: image embeddings are random), with
the tokenizer of ``--tokenizer`` (the tiny checkpoint); ``--layers`` shortens it for CPU runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mm_models.qwen2vl import EncodedImage, LanguageModel

from .api import GenerationRequest, ImageLoader, SamplingParams
from .config import EngineConfig
from .engine import LLMEngine
from .runner import ModelRunner

log = logging.getLogger("mm_engine.measure")

#: Batched bf16 results may differ from batch 1 only at a step whose batch-1 top-2 logit gap is below this.
NEAR_TIE_GAP = 0.2


def build_random_2b(tokenizer_dir: Path, device: str, dtype: torch.dtype, layers: int = 0) -> tuple[Any, Any]:
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from mm_models.qwen2vl._loading import load_tokenizer
    from mm_models.sized import ENDOFTEXT, IM_END, SPECIAL_TOKENS, hf_config, preset_config

    tok = load_tokenizer(tokenizer_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    overrides = {"text.num_hidden_layers": layers, "vision.depth": 1} if layers else {"vision.depth": 1}
    config = hf_config(preset_config("qwen2-vl-2b", overrides), ids, str(dtype).removeprefix("torch."))
    for c in (config, config.text_config, config.vision_config):
        try:
            c._attn_implementation = "sdpa"
        except (AttributeError, ValueError):  # older configs: the model picks its default
            pass
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT], do_sample=False
    )
    return model, tok


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_step_ms(model: Any, batches: list[int], prompt_len: int, steps: int) -> dict[int, float]:
    """Median time of one decode forward at each batch size (rows' lengths staggered: the masked path)."""
    runner = ModelRunner(model, max(batches), prompt_len + max(batches) + steps + 2)
    gen = torch.Generator().manual_seed(0)
    for row in range(max(batches)):
        ids = [
            t if t != runner.image_token_id else 5
            for t in torch.randint(10, 900, (prompt_len + row,), generator=gen).tolist()
        ]
        runner.prefill(row, runner.prepare(ids, []), 0, len(ids))
    out = {}
    for batch in batches:
        times = []
        for s in range(steps + 3):
            _sync(runner.device)
            t0 = time.perf_counter()
            runner.decode([5] * batch, [prompt_len + r + s for r in range(batch)], [0] * batch)
            _sync(runner.device)
            times.append(time.perf_counter() - t0)
        out[batch] = 1000 * statistics.median(times[3:])
        log.info("decode step, batch %d: %.2f ms", batch, out[batch])
    return out


class _Sink:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.final: Any = None

    def on_tokens(self, token_ids, text_delta):
        self.times.append(time.perf_counter())
        self.tokens += token_ids

    def on_finish(self, output):
        self.final = output

    def on_error(self, error):
        self.final = error


def prefill_stall(model: Any, tok: Any, device: str, running: int, join_len: int, chunk: int) -> dict[str, float]:
    """Run ``running`` decoding sequences, let one ``join_len``-token prompt join; the longest gap
    between two tokens of the running ones while it prefills, vs their median gap."""
    cfg = EngineConfig(
        max_batch_size=running + 1, max_seq_len=join_len + 600, device=device, max_num_batched_tokens=chunk or join_len
    )
    engine = LLMEngine(model, tok, cfg)
    try:
        sinks = [_Sink() for _ in range(running)]
        for i, sink in enumerate(sinks):
            engine.submit(GenerationRequest(f"run{i}", [30 + i] * 16, [], None, SamplingParams(max_tokens=500)), sink)
        while min(len(s.times) for s in sinks) < 20:
            time.sleep(0.001)
        joiner = _Sink()
        t_join = time.perf_counter()
        engine.submit(GenerationRequest("join", [7] * join_len, [], None, SamplingParams(max_tokens=2)), joiner)
        while not joiner.times:
            time.sleep(0.0005)
        t_first = joiner.times[0]
        time.sleep(0.05)
    finally:
        engine.close()
    gaps_before, gaps_during = [], []
    for s in sinks:
        for a, b in zip(s.times, s.times[1:]):
            (gaps_during if b > t_join and a < t_first else gaps_before if b <= t_join else []).append(b - a)
    return {
        "chunk": chunk or join_len,
        "join_len": join_len,
        "running": running,
        "itl_median_ms": 1000 * statistics.median(gaps_before),
        "max_gap_during_join_ms": 1000 * max(gaps_during, default=0.0),
        "join_ttft_ms": 1000 * (t_first - t_join),
    }


class _FixedLoader(ImageLoader):
    def __init__(self, images: list[EncodedImage]) -> None:
        self.images = images

    def load(self, cancelled):
        return self.images

    def abort(self, reason):
        pass


def _exact_inputs(lm: LanguageModel, n: int) -> list[tuple[str, list[EncodedImage], int]]:
    gen = torch.Generator().manual_seed(1)
    std = float(lm.hf_model.get_input_embeddings().weight.detach().float().std())
    cases = []
    for i in range(n):
        images = []
        for j in range(i % 3):
            h, w = 2 * (4 + 3 * j + i % 5), 2 * (6 + 2 * i % 7)
            emb = (torch.randn(h * w // 4, lm.hidden_size, generator=gen) * std).to(lm.dtype).to(lm.device)
            images.append(EncodedImage(embeds=emb, grid_thw=(1, h, w)))
        cases.append((f"case {i} " + "tok " * (7 * i), images, 16 + 8 * (i % 3)))
    return cases


def exactness(model: Any, tok: Any, device: str, n: int) -> dict[str, Any]:
    """Engine at batch 1 vs HF generate (must be equal); engine batched vs batch 1 (near-tie rule)."""
    lm = LanguageModel(model, tok, torch.device(device))
    cases = _exact_inputs(lm, n)
    hf = [lm.generate(p, ims, mt) for p, ims, mt in cases]
    requests = [
        GenerationRequest(
            f"x{i}",
            lm.build_input_ids(p, [im.num_tokens for im in ims]),
            [im.num_tokens for im in ims],
            _FixedLoader(ims) if ims else None,
            SamplingParams(max_tokens=mt),
        )
        for i, (p, ims, mt) in enumerate(cases)
    ]
    results = {}
    for name, slots in (("batch1", 1), ("batched", n)):
        engine = LLMEngine(model, tok, EngineConfig(max_batch_size=slots, max_seq_len=4096, device=device))
        sinks = [_Sink() for _ in requests]
        try:
            for r, s in zip(requests, sinks, strict=True):
                engine.submit(r, s)
            while any(s.final is None for s in sinks):
                time.sleep(0.002)
        finally:
            engine.close()
        results[name] = [s.tokens for s in sinks]
    gaps = [_greedy_gaps(model, r, len(t)) for r, t in zip(requests, results["batch1"], strict=True)]
    divergences = []
    for i, (one, many) in enumerate(zip(results["batch1"], results["batched"], strict=True)):
        k = next((j for j, (a, b) in enumerate(zip(one, many)) if a != b), None)
        if k is not None:
            divergences.append({"case": i, "step": k, "batch1_top2_gap": gaps[i][k]})
    return {
        "n": n,
        "batch1_equal_hf": sum(a == b for a, b in zip(results["batch1"], hf, strict=True)),
        "batched_equal_batch1": n - len(divergences),
        "divergences": divergences,
        "divergences_within_rule": all(d["batch1_top2_gap"] < NEAR_TIE_GAP for d in divergences),
        "near_tie_gap": NEAR_TIE_GAP,
    }


def _greedy_gaps(model: Any, request: GenerationRequest, steps: int) -> list[float]:
    """Top-2 logit gap at each step of the batch-1 greedy run (the runner, as the engine calls it)."""
    runner = ModelRunner(model, 1, len(request.prompt_ids) + steps + 1)
    images = request.images.load(lambda: False) if request.images else []
    prompt = runner.prepare(request.prompt_ids, images)
    logits = runner.prefill(0, prompt, 0, prompt.length)
    gaps, n = [], prompt.length
    for _ in range(steps):
        top = torch.topk(logits.reshape(-1), 2).values
        gaps.append(float(top[0] - top[1]))
        token = int(logits.reshape(-1).argmax())
        logits = runner.decode([token], [n], [prompt.rope_delta])[0]
        n += 1
    return gaps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint dir, or qwen2-vl-2b-random")
    p.add_argument("--layers", type=int, default=0, help="qwen2-vl-2b-random: text layers (0: 28, the real depth)")
    p.add_argument("--tokenizer", default=".cache/models/tiny-qwen2-vl", help="for qwen2-vl-2b-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--stall-running", type=int, default=8)
    p.add_argument("--stall-join-len", type=int, default=2048)
    p.add_argument("--chunks", default="128,512,0", help="max_num_batched_tokens values; 0 = unchunked")
    p.add_argument("--exact", type=int, default=0, help="exactness check over N requests (0: skip)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dtype = getattr(torch, args.dtype)
    t0 = time.monotonic()
    if args.model == "qwen2-vl-2b-random":
        model, tok = build_random_2b(Path(args.tokenizer), args.device, dtype, args.layers)
    else:
        model = LanguageModel.from_pretrained(args.model, device=args.device, dtype=dtype)
        model, tok = model.hf_model, model.tokenizer
    report: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "load_s": round(time.monotonic() - t0, 1),
    }
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    import transformers

    report["transformers"] = transformers.__version__
    sections = {
        "decode_step_ms": lambda: decode_step_ms(
            model, [int(b) for b in args.batches.split(",")], args.prompt_len, args.steps
        ),
        "prefill_stall": lambda: [
            prefill_stall(model, tok, args.device, args.stall_running, args.stall_join_len, int(c))
            for c in args.chunks.split(",")
        ],
    }
    if args.exact:
        sections["exactness"] = lambda: exactness(model, tok, args.device, args.exact)
    for name, run in sections.items():
        try:  # one failing section must not lose the others' figures
            report[name] = run()
        except Exception as e:  # noqa: BLE001 - reported in the output
            log.exception("%s failed", name)
            report[name] = {"error": repr(e)}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
