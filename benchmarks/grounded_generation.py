"""Benchmark of grounded generation: what capturing attend-and-segment maps costs during ``generate``.

A random LlamaForCausalLM (``--shape small``: 8 layers, width 512, 8 heads; ``--shape vicuna7b``: the
Vicuna-7B shape, for a GPU) generates 64 new tokens (``min_new_tokens = max_new_tokens``, so every step
runs) from ``inputs_embeds`` of 576 image tokens + 50 prompt tokens, at batch 1 and 8, in two cases:

- ``uniform``: every sample's image at the same place (one slice of the keys);
- ``mixed``: images of different sizes in one batch, as Qwen-VL or LLaVA-NeXT produce them: sample b has
  ``MIXED_SCALES[b % 3]`` times the image tokens (576, 324, 900 by default), the batch left-padded to the
  longest, and the capture given each sample's positions as a tensor (a gather, the general path);

and three ways:

- ``plain``: SDPA, no capture (the floor);
- ``capture``: SDPA wrapped by ``grounding.capture.AttentionCapture``, maps moved to the CPU at the end;
- ``eager``: eager attention + ``output_attentions=True, return_dict_in_generate=True``, then the same maps
  reduced from the returned attentions (the naive way).

Time: after one short warm-up per variant, ``--repeats`` rounds run every variant once, interleaved and in
an order rotated each round, so that changing load on a shared machine hits all variants alike; the table
gives the median wall time and the median process CPU time (all threads, ``time.process_time``), and each
ratio to plain is the median over rounds of the per-round ratio. On a shared, oversubscribed CPU pass
``--threads 1``: with several OpenMP threads each parallel region waits for threads the OS has descheduled,
which inflates every time erratically (and CPU time too, as waiting threads spin). Memory is the peak growth
during the runs over the state with the model loaded: on CUDA ``torch.cuda.max_memory_allocated`` minus the
memory allocated before (everything the runs allocate, outputs included); on CPU the peak resident set size
(RSS) of the process, sampled every millisecond by a thread reading psutil and cross-checked with
``getrusage``'s ``ru_maxrss`` (the kernel's exact high-water mark), minus the RSS before the run (after a tiny
warm-up generation that loads libraries and thread pools). On CPU every (variant, batch) memory run is one
full generation in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB, so that RSS follows the
live tensor bytes rather than what the allocator happens to keep from earlier frees.
The table ends with the capture / plain ratios (goal: time <= 1.10 at every batch size, in both cases).

    python benchmarks/grounded_generation.py                              # CPU, small shape
    python benchmarks/grounded_generation.py --device cuda --dtype bfloat16 --shape vicuna7b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from grounding.capture import AttentionCapture  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
    "vicuna7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
}
VARIANTS = ("plain", "capture", "eager")
CASES = ("uniform", "mixed")
#: Image-token counts of the mixed case relative to --image-tokens (576 -> 576, 324, 900: 24^2, 18^2, 30^2).
MIXED_SCALES = (1.0, 0.5625, 1.5625)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    # Initialise on the target device in the target dtype: a 7B model built on the CPU in float32 first
    # would need 28 GB of host memory and minutes.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class PeakRss:
    """Samples the process RSS in a background thread; torch kernels release the GIL, so it keeps running."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batch_layout(
    case: str, batch: int, n_image: int, n_prompt: int
) -> tuple[int, list[int], list[torch.Tensor]]:
    """The padded length, and per sample its left padding and image positions (after a one-token "BOS")."""
    counts = [n_image if case == "uniform" else round(n_image * MIXED_SCALES[b % 3]) for b in range(batch)]
    length = max(counts) + 1 + n_prompt
    pads = [length - (1 + n + n_prompt) for n in counts]
    positions = [torch.arange(p + 1, p + 1 + n) for p, n in zip(pads, counts, strict=True)]
    return length, pads, positions


def make_runner(
    model: LlamaForCausalLM, variant: str, batch: int, args: argparse.Namespace
) -> Callable[[int], object]:
    n_image, n_prompt = args.image_tokens, args.prompt_tokens
    device = model.device
    length, pads, positions = batch_layout(args.case, batch, n_image, n_prompt)
    generator = torch.Generator(device="cpu").manual_seed(1)
    embeds = torch.randn(batch, length, model.config.hidden_size, generator=generator)
    embeds = embeds.to(device=device, dtype=model.dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    # uniform: the (start, end) span form, a slice; mixed: per-sample position tensors, a gather.
    image_positions = [(1, 1 + n_image)] * batch if args.case == "uniform" else positions
    index = [p.to(device) for p in positions]

    def run(new_tokens: int):
        kwargs = dict(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
        if variant == "plain":
            return model.generate(**kwargs)
        if variant == "capture":
            with AttentionCapture(model, image_positions) as cap:
                model.generate(**kwargs)
            return cap.maps()
        out = model.generate(output_attentions=True, return_dict_in_generate=True, **kwargs)
        maps = [
            torch.stack(
                [
                    torch.stack([layer[b, :, -1, index[b]] for layer in step]).float().mean(dim=(0, 1))
                    for step in out.attentions
                ]
            ).cpu()
            for b in range(batch)
        ]
        return out, maps

    return run


def _set_variant(model: LlamaForCausalLM, variant: str) -> None:
    model.set_attn_implementation("eager" if variant == "eager" else "sdpa")


def measure_time(
    model: LlamaForCausalLM, variants: list[str], batch: int, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU times of every run per variant, the variants interleaved run by run.

    Interleaving, with the order rotated each round (plain, capture, eager; capture, eager, plain; ...),
    exposes every variant to the same load on a shared machine and to the same predecessor effects (e.g.
    the page faults that follow the release of eager's attentions); the ratios are then taken per round.
    """
    device = str(model.device)
    runners = {v: make_runner(model, v, batch, args) for v in variants}
    runs: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in variants}
    with torch.inference_mode():
        for variant in variants:  # warm-up: kernels, allocator, lazy initialisation
            _set_variant(model, variant)
            runners[variant](2)
        for round_index in range(args.repeats):
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                _set_variant(model, variant)
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                result = runners[variant](args.new_tokens)
                _sync(device)
                runs[variant]["wall"].append(time.perf_counter() - start)
                runs[variant]["cpu"].append(time.process_time() - cpu_start)
                del result
    _set_variant(model, "plain")
    return runs


def measure_memory(model: LlamaForCausalLM, variant: str, batch: int, args: argparse.Namespace) -> float:
    """Peak memory growth in MiB of one full run over the loaded-model state (see the module docstring)."""
    device = str(model.device)
    _set_variant(model, variant)
    run = make_runner(model, variant, batch, args)
    is_cuda = device.startswith("cuda")
    with torch.inference_mode():
        # Load libraries and thread pools with a tiny input first, so the peak is the run's own, without
        # leaving large freed buffers behind for the measured run to reuse.
        model.generate(
            inputs_embeds=torch.zeros(1, 4, model.config.hidden_size, device=model.device, dtype=model.dtype),
            max_new_tokens=1,
            do_sample=False,
        )
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
        ru_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakRss() if not is_cuda else nullcontext() as sampler:
        with torch.inference_mode():
            result = run(args.new_tokens)
            _sync(device)
            del result
    if is_cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # ru_maxrss cannot be reset: it only says something if the run pushed it past its earlier value.
        peak = max(sampler.peak, ru_peak if ru_peak > ru_base else 0) - base
    _set_variant(model, "plain")
    return peak / MIB


def _worker(args: argparse.Namespace) -> None:
    model = build_model(args.shape, args.device, DTYPES[args.dtype])
    if args.worker_task == "time":
        print(json.dumps(measure_time(model, args.variants, args.worker_batch, args)))
    else:
        (variant,) = args.variants
        print(json.dumps(measure_memory(model, variant, args.worker_batch, args)))


def _run_isolated(task: str, variants: list[str], batch: int, case: str, argv: list[str]):
    cmd = [
        sys.executable, os.path.abspath(__file__), *argv,
        "--worker-task", task, "--worker-batch", str(batch), "--variants", *variants, "--worker-case", case,
    ]  # fmt: skip
    env = dict(os.environ)
    if task == "memory":
        # glibc's adaptive mmap threshold lets freed multi-MB blocks (the KV cache is re-allocated by
        # torch.cat every step) stay resident or not depending on allocation order, which makes RSS noisy.
        # A fixed 64 KiB threshold maps every tensor buffer on allocation and unmaps it on free, so RSS
        # follows the live tensor bytes.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{task} {variants} {case} batch {batch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _paired_ratio(runs: dict, variant: str, key: str) -> float:
    """Median over rounds of this variant's time divided by plain's time in the same round."""
    return statistics.median(a / b for a, b in zip(runs[variant][key], runs["plain"][key], strict=True))


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    mem_label = "peak GPU alloc" if args.device.startswith("cuda") else "peak RSS growth"
    print(
        f"\nshape={args.shape} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"prompt={args.image_tokens}+{args.prompt_tokens} new={args.new_tokens} rounds={args.repeats}"
    )
    header = (
        f"| case | batch | variant | wall s (median) | CPU s (median) | tokens/s | {mem_label} MiB "
        "| wall / plain | CPU / plain | mem / plain |"
    )
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    by_key = {(r["case"], r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        plain = by_key.get((r["case"], r["batch"], "plain"))
        mem_ratio = f"{r['peak_mib'] / plain['peak_mib']:.2f}" if plain and plain["peak_mib"] > 0 else "-"
        print(
            f"| {r['case']} | {r['batch']} | {r['variant']} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r['peak_mib']:.1f} | {r.get('wall_ratio', float('nan')):.3f} | "
            f"{r.get('cpu_ratio', float('nan')):.3f} | {mem_ratio} |"
        )
    print("(ratios: median over rounds of the per-round ratio to plain)")
    for case, batch in sorted({(r["case"], r["batch"]) for r in rows}):
        cap = by_key.get((case, batch, "capture"))
        if cap and "wall_ratio" in cap:
            verdict = "ok" if cap["wall_ratio"] <= 1.10 else "ABOVE GOAL"
            print(
                f"{case} batch {batch}: capture / plain wall time = {cap['wall_ratio']:.3f} "
                f"(goal <= 1.10: {verdict}); CPU time = {cap['cpu_ratio']:.3f}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--prompt-tokens", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--worker-task", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker-case", dest="case", choices=CASES, default="uniform", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_task is not None:
        _worker(args)
        return
    rows = []
    on_cuda = args.device.startswith("cuda")
    # CUDA peak statistics reset cleanly, so one process and one model serve every measurement; on the CPU
    # each memory measurement gets a fresh process and each batch size's timing another one.
    model = build_model(args.shape, args.device, DTYPES[args.dtype]) if on_cuda else None
    for case in args.cases:
        args.case = case
        for batch in args.batch_sizes:
            if on_cuda:
                seconds = measure_time(model, args.variants, batch, args)
                peaks = {v: measure_memory(model, v, batch, args) for v in args.variants}
            else:
                seconds = _run_isolated("time", args.variants, batch, case, argv)
                peaks = {v: _run_isolated("memory", [v], batch, case, argv) for v in args.variants}
            for variant in args.variants:
                wall = statistics.median(seconds[variant]["wall"])
                row = {
                    "case": case,
                    "variant": variant,
                    "batch": batch,
                    "seconds": wall,
                    "cpu_seconds": statistics.median(seconds[variant]["cpu"]),
                    "tokens_per_s": batch * args.new_tokens / wall,
                    "peak_mib": peaks[variant],
                }
                if "plain" in seconds:
                    row["wall_ratio"] = _paired_ratio(seconds, variant, "wall")
                    row["cpu_ratio"] = _paired_ratio(seconds, variant, "cpu")
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
