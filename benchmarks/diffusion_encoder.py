"""Speed and peak memory of the diffusion encoder's truncated U-Net pass against the full U-Net pass.

Both passes run the same randomly initialised U-Net with SD-1.5's architecture (``--width-scale`` shrinks
its channels for CPU runs) on the same noisy latents (``--image-size`` / 8) and 576-or-so conditioning
tokens: ``full`` is diffusers' ``UNet2DConditionModel.forward`` and ``truncated`` is
``encoders.diffusion.unet_features`` stopped after ``up_blocks[--up-block]``. Speed: the two kinds of pass
alternate so both see the same load (CPUs here are shared) and images/s comes from the median pass time.
Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one warmed-up pass minus what the weights and
inputs hold; on CPU, how far the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) rises above the resident set during one warmed-up pass, a coarser figure that
includes allocator behaviour (Linux only). With ``--grad`` each pass also back-propagates into the
conditioning tokens, as training the implicit captioner does. Example (the H100 reference, random weights:
full ~413 img/s, truncated ~744 img/s, 1.8x): ``python benchmarks/diffusion_encoder.py --dtype bf16
--batch 16``; on CPU the defaults shrink the U-Net to a fifth of its width at batch 2.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

# Run as a script from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.base import seeded_init  # noqa: E402
from encoders.diffusion import sd15_unet_config, unet_features  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("full", "truncated")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--batch", type=int, default=16 if cuda else 2)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--up-block", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=576, help="conditioning tokens (CLIP-336: 576)")
    parser.add_argument(
        "--width-scale",
        type=float,
        default=1.0 if cuda else 0.2,
        help="scale SD-1.5's U-Net channels (rounded to multiples of 32); 1.0 = the real architecture",
    )
    parser.add_argument("--iters", type=int, default=20 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--grad", action="store_true", help="also backward into the conditioning tokens")
    return parser.parse_args(argv)


def scaled_channels(scale: float) -> list[int]:
    """SD-1.5's U-Net widths times ``scale``, kept multiples of 32 so its 32-group GroupNorms still divide."""
    return [max(32, round(c * scale / 32) * 32) for c in sd15_unet_config()["block_out_channels"]]


def build_unet(args: argparse.Namespace) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    # diffusers warns on every dtype cast of a model it did not load; random weights have nothing to keep.
    diffusers_logging.set_verbosity_error()
    config = {**sd15_unet_config(), "block_out_channels": scaled_channels(args.width_scale)}
    with seeded_init(0):
        unet = UNet2DConditionModel(**config)
    return unet.to(device=args.device, dtype=DTYPES[args.dtype]).eval().requires_grad_(False)


def make_inputs(args: argparse.Namespace, unet: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    side = args.image_size // 8
    sample = torch.randn(args.batch, 4, side, side, generator=gen).to(device, dtype)
    cond = torch.randn(args.batch, args.tokens, unet.config.cross_attention_dim, generator=gen)
    return sample, cond.to(device, dtype).requires_grad_(args.grad), torch.tensor([100], device=device)


def one_pass(args: argparse.Namespace, unet: torch.nn.Module, inputs: tuple, mode: str) -> None:
    sample, cond, timestep = inputs
    with torch.set_grad_enabled(args.grad):
        if mode == "full":
            out = unet(sample, timestep, encoder_hidden_states=cond).sample
        else:
            out = unet_features(unet, sample, timestep, cond, args.up_block)
        if args.grad:
            out.float().sum().backward()
            cond.grad = None
    if sample.is_cuda:
        torch.cuda.synchronize(sample.device)


def time_passes(args: argparse.Namespace, unet: torch.nn.Module, inputs: tuple) -> dict[str, float]:
    """Images per second of each pass kind from the median pass time.

    The passes alternate so that both kinds see the same machine load (shared CPUs, GPU clocks).
    """
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.iters):
        for mode in MODES:
            start = time.perf_counter()
            one_pass(args, unet, inputs, mode)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    return {mode: args.batch / statistics.median(ts) for mode, ts in times.items()}


def cuda_peak_mib(args: argparse.Namespace, unet: torch.nn.Module, mode: str) -> float:
    """Peak CUDA memory of one (already warmed-up) pass over what the weights and inputs hold, in MiB."""
    inputs = make_inputs(args, unet)
    device = inputs[0].device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    one_pass(args, unet, inputs, mode)
    return (torch.cuda.max_memory_allocated(device) - held) / 2**20


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_mib(args: argparse.Namespace, unet: torch.nn.Module, mode: str) -> float:
    """Growth of the resident set's high-water mark over one (already warmed-up) pass, in MiB (Linux).

    ru_maxrss cannot be reset (and a spawned child inherits its parent's at exec), so this resets the
    kernel's VmHWM through /proc/self/clear_refs; malloc_trim first returns freed heap pages, or the pass
    could reuse them without the peak moving.
    """
    inputs = make_inputs(args, unet)
    one_pass(args, unet, inputs, mode)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_mib("VmRSS")
    one_pass(args, unet, inputs, mode)
    return _proc_status_mib("VmHWM") - before


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    unet = build_unet(args)
    speed = time_passes(args, unet, make_inputs(args, unet))
    peak_mib = cuda_peak_mib if cuda else cpu_peak_mib
    memory = {mode: peak_mib(args, unet, mode) for mode in MODES}
    side = args.image_size // 8
    what = "peak CUDA memory over weights+inputs" if cuda else "peak RSS growth over the pass"
    print(
        f"U-Net {scaled_channels(args.width_scale)} @ {args.image_size} px (latents {side}x{side}), "
        f"batch {args.batch}, {args.dtype} on {args.device}, up_blocks[{args.up_block}], "
        f"{'forward+backward' if args.grad else 'forward'}, median of {args.iters} alternating passes"
    )
    col = len(what) + 6
    print(f"| pass      | images/s | {what} (MiB) |")
    print(f"|-----------|----------|{'-' * (col + 2)}|")
    for mode in MODES:
        print(f"| {mode:<9} | {speed[mode]:8.2f} | {memory[mode]:{col}.1f} |")
    ratio_mem = memory["truncated"] / max(memory["full"], 1e-9)
    print(f"| ratio t/f | {speed['truncated'] / speed['full']:7.2f}x | {ratio_mem:{col - 1}.2f}x |")


if __name__ == "__main__":
    main()
