"""Training-step benchmark: q8 presets against fp32 (and bf16 AMP on a GPU), in one process, on
the same model and input.

    python scripts/bench.py                                  # resnet18, 32x32, batch 128, CPU
    python scripts/bench.py --model resnet50 --batch 256 --presets fp32,q8_bifurcated,q8
    python scripts/bench.py --device cuda --model resnet50 --image-size 224 \
        --gemm dequantized,codes,int8                        # a GPU: every GEMM mode, bf16 AMP
    python scripts/bench.py --compile                        # eager and torch.compile'd

Per preset: median step time (forward, backward, SGD step), its ratio to fp32 (and to bf16
autocast, `bf16_amp`, with channels_last: what GPU users run), images/s,
bytes autograd saves for backward (each storage once; parameters, alive anyway, not counted)
and its ratio to fp32, and peak memory of a step (CUDA's peak allocated, or on a CPU the peak of
live tensors: PeakLiveTensors).
Steps of all presets are interleaved, and the time ratio is the median over steps of each
step's time over the fp32 step just before it (with the interquartile range of those ratios):
on a shared or virtual machine whose speed drifts by 10-20% within a minute, the pairs cancel
the drift that a ratio of two medians keeps.

With --compile every preset is timed twice, eager and torch.compile'd ("<preset> compiled"):
a compiled preset's ratios are to compiled fp32 (and compiled bf16 AMP). Memory is measured on
the eager models only. q8 is the installed package (make setup: pip install -e .); the presets
are read from this repository's conf/quant/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import q8
from q8.kernels import BACKENDS, Kernels

ROOT = Path(__file__).resolve().parents[1]  # conf/quant/*.yaml: the presets train.py uses


def load_preset(name: str) -> q8.QuantConfig:
    """A quant preset from conf/quant/<name>.yaml (the same files train.py uses)."""
    path = ROOT / "conf" / "quant" / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"bench: unknown preset {name!r}; valid presets: {', '.join(names)}")
    d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return q8.QuantConfig.from_dict(d)


AMP = "bf16_amp"  # fp32 weights, bf16 autocast: the baseline of GPU training
COMPILED = "compiled"  # the suffix of a preset's torch.compile'd twin (--compile)


def ratio_or_none(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def build(model_name: str, config: q8.QuantConfig, num_classes: int, device: str,
          channels_last: bool = False) -> nn.Module:
    """The timm model quantized as `config` says (on its backend), on `device`."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=num_classes)
    model = q8.quantize_model(model, config).to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def saved_bytes(model: nn.Module, loss_fn) -> int:  # noqa: ANN001
    """Bytes autograd keeps for the backward of loss_fn() (each storage once, parameters not
    counted; autocast's bf16 copies of them are)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


class PeakLiveTensors(TorchDispatchMode):
    """The peak bytes held by tensors that ops create inside the block (each storage once,
    counted from the op that allocates it until it is freed): on a CPU, what
    torch.cuda.max_memory_allocated minus the allocation at the start is on a GPU. An op's
    output that shares an input's storage (a view, an in-place op) allocates nothing. Buffers an
    op allocates and frees inside itself (a convolution's workspace) are not seen."""

    def __init__(self, breakdown: bool = False) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.bytes = self.peak = 0
        self.breakdown = breakdown
        self.at_peak: dict[str, int] = {}  # with breakdown: bytes live at the peak, per creator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, *_) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(key)[1]
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self.live:
                    creator = f"{func.overloadpacket.__name__} -> {t.dtype}".replace("torch.", "")
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes(), creator)
                    self.bytes += storage.nbytes()
        if self.bytes > self.peak:
            self.peak = self.bytes
            if self.breakdown:
                self.at_peak = {}
                for _, nbytes, creator in self.live.values():
                    self.at_peak[creator] = self.at_peak.get(creator, 0) + nbytes
        return out


def paired_ratio(times: list[float], base: list[float]) -> tuple[float, list[float]]:
    """Median and interquartile range of times[i] / base[i] (steps i taken side by side)."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    if len(ratios) < 2:
        return ratios[0], [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), [q1, q3]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--presets", default="fp32,q8_bifurcated")
    p.add_argument("--gemm", default="dequantized",
                   help="comma-separated GEMM modes (QuantConfig.gemm) of every q8 preset")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="also time fp32 weights under bf16 autocast (bf16_amp); auto = on CUDA")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="models and input in channels_last; auto = on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (and compilation)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="q8's kernels (QuantConfig.backend); auto = the device's fastest")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--compile", action="store_true",
                   help="also time every preset under torch.compile, against compiled fp32")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators of one step per preset")
    args = p.parse_args(argv)

    dev = args.device
    on_cuda = dev.startswith("cuda")
    amp = args.amp == "on" or (args.amp == "auto" and on_cuda)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and on_cuda)
    presets = [n.strip() for n in args.presets.split(",") if n.strip() and n.strip() != "fp32"]
    modes = [m.strip() for m in args.gemm.split(",") if m.strip()]
    configs: dict[str, q8.QuantConfig] = {"fp32": load_preset("fp32")}
    if amp:
        configs[AMP] = load_preset("fp32")
    for preset in presets:
        for mode in modes:
            name = preset if modes == ["dequantized"] else f"{preset}[{mode}]"
            configs[name] = dataclasses.replace(load_preset(preset), backend=args.backend,
                                                gemm=mode)
    if args.compile:
        configs |= {f"{n} {COMPILED}": c for n, c in configs.items()}
    names = list(configs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(dev)
    models = {n: build(args.model, c, args.num_classes, dev, channels_last)
              for n, c in configs.items()}
    for n, m in models.items():
        if n.endswith(COMPILED):
            m.compile()  # in place: traced at the first step, in the warm-up
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in models.items()}

    def loss_of(name: str) -> torch.Tensor:
        with torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=name.startswith(AMP)):
            return nn.functional.cross_entropy(models[name](x), y)

    def step(name: str) -> float:
        opt = opts[name]
        if on_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(name).backward()
        opt.step()
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    results: dict[str, dict] = {n: {"preset": n, "config": "bf16 autocast" if n.startswith(AMP)
                                    else configs[n].short_str() + f" gemm={configs[n].gemm}"}
                                for n in names}
    for n in names:  # memory first, one preset at a time, before the timing warms caches
        if n.endswith(COMPILED):
            results[n]["saved_bytes"] = results[n]["peak_bytes"] = None
            continue
        r = results[n]
        r["saved_bytes"] = saved_bytes(models[n], lambda n=n: loss_of(n))
        step(n)  # the optimizer's state exists from the first step on
        opts[n].zero_grad(set_to_none=True)  # the step allocates its gradients anew
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(n)
            r["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            with PeakLiveTensors() as live:
                step(n)
            r["peak_bytes"] = live.peak
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        for n in names:  # interleaved
            t = step(n)
            if i >= args.warmup:
                times[n].append(t)
            print(f"\r{'warm-up' if i < args.warmup else 'timing'} {i + 1}/"
                  f"{args.warmup + args.steps} {n:>20s} {t * 1e3:8.1f} ms", end="", flush=True,
                  file=sys.stderr)
    print(file=sys.stderr)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        for n in names:
            with profile(activities=acts) as prof:
                step(n)
            key = "cuda_time_total" if on_cuda else "self_cpu_time_total"
            print(f"\n== {n}: where one step's time goes")
            print(prof.key_averages().table(sort_by=key, row_limit=15))

    for n in names:
        r = results[n]
        r["step_ms"] = statistics.median(times[n]) * 1e3
        r["images_per_s"] = args.batch / (r["step_ms"] / 1e3)
    for n in names:
        r = results[n]
        suffix = f" {COMPILED}" if n.endswith(COMPILED) else ""  # compiled against compiled
        fp32, bf16 = "fp32" + suffix, AMP + suffix
        r["step_ratio"], r["step_ratio_iqr"] = paired_ratio(times[n], times[fp32])
        r["step_ratio_of_medians"] = r["step_ms"] / results[fp32]["step_ms"]
        r["saved_ratio"] = ratio_or_none(r["saved_bytes"], results["fp32"]["saved_bytes"])
        r["peak_ratio"] = ratio_or_none(r["peak_bytes"], results["fp32"]["peak_bytes"])
        if amp:  # against the baseline GPU users run
            r["amp_step_ratio"], r["amp_step_ratio_iqr"] = paired_ratio(times[n], times[bf16])
            r["amp_peak_ratio"] = ratio_or_none(r["peak_bytes"], results[AMP]["peak_bytes"])

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if on_cuda else f"CPU, {threads} threads"
    kernels = Kernels(args.backend).on(x).name
    header = (f"{args.model} {args.image_size}x{args.image_size} batch {args.batch} on {where}, "
              f"median of {args.steps} steps, q8 backend: {kernels}"
              f"{', channels_last' if channels_last else ''}"
              "; time ratios: median of paired step ratios (interquartile range)")
    print(header)
    cols = ["preset", "step ms", "x fp32", *(["x bf16 AMP"] if amp else []), "img/s",
            "saved MiB", "x fp32", "peak MiB", "x fp32", *(["x bf16 AMP"] if amp else [])]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def ratio(value: float, iqr: list[float]) -> str:
        return f"{value:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f})"

    def maybe(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:.1f}"

    for n in names:
        r = results[n]
        cells = [n, f"{r['step_ms']:.1f}", ratio(r["step_ratio"], r["step_ratio_iqr"])]
        if amp:
            cells.append(ratio(r["amp_step_ratio"], r["amp_step_ratio_iqr"]))
        cells += [f"{r['images_per_s']:.0f}", mib(r["saved_bytes"]), maybe(r["saved_ratio"], 3),
                  mib(r["peak_bytes"]), maybe(r["peak_ratio"])]
        if amp:
            cells.append(maybe(r["amp_peak_ratio"]))
        print("| " + " | ".join(cells) + " |")
    out = {"header": header, "args": vars(args), "torch": torch.__version__,
           "results": list(results.values())}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
