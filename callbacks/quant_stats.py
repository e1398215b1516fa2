"""QuantStatsCallback: per-layer quantization error and gradient statistics, every N steps.

On a logging step (global step % N == 0, global rank 0 only) it hooks every conv / linear
layer and every quantized BatchNorm for one training batch, and measures with q8's quantizer
what each quantization does (Banner et al. 2018):

    quant/<layer>/weight_*   W -> W_hat, nearest, per tensor or per output channel
    quant/<layer>/act_*      layer input x -> x_hat, nearest, over the batch's [min, max]
    quant/<layer>/grad_*     g_l = dL/dy -> its grad_bits copy (dL/dx path), stochastic
    quant/<layer>/wgrad_*    g_l -> its wgrad_bits copy (dL/dW path, bifurcation)
        * = mse, sqnr_db, clip_frac, scale
    quant/<layer>/act_eval_clip_frac   share of x outside the running range eval quantizes with
    quant/<layer>/wgrad_cosine         cos(g_W as q8 computes it, x^T g_l in fp32)
    grads/<layer>/{wgrad,g}_{norm,mean,std,max_abs,zero_frac}
    hist/<layer>/{wgrad,g}             histograms every K steps (W&B loggers only)

and, once, the config entry `q8_stats_layers`: the layer names in network order. The per-layer
scalars stay out of a W&B run's summary (its table and end-of-run printout keep the run's own
metrics); their history is complete.

Hooks are removed and every captured tensor dropped when the batch ends. On a logging step the
fp32 input of each layer is kept until its backward (for the fp32 reference g_W): the memory of
fp32 activations, for that one step.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from callbacks.quant_metrics import act_outside_frac, cosine, quant_error, tensor_stats
from q8.layers import QuantLayerMixin, explicit_padding
from q8.norm import QuantNormMixin

log = logging.getLogger(__name__)

LAYERS_KEY = "q8_stats_layers"  # config entry: the measured layers in network order


@dataclass
class _Probe:
    """One layer's hooks and measurements during one logging step."""

    name: str
    module: nn.Module
    act_bits: int | None = None
    weight_bits: int | None = None
    per_channel: bool = False
    grad_bits: int | None = None
    wgrad_bits: int | None = None
    rounding: str = "stochastic"
    has_weight_grad: bool = False  # a conv / linear: dL/dW = x^T g_l
    quantized_gemm: bool = False  # a q8 conv / linear: compare its g_W with the fp32 one
    values: dict[str, Tensor] = field(default_factory=dict)  # key -> 0-d tensor
    hists: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    ref_wgrad: Tensor | None = None  # fp32 x^T g_l, until the layer's own g_W arrives


def _probe_for(name: str, module: nn.Module) -> _Probe | None:
    if isinstance(module, QuantLayerMixin):
        s = module.q8_spec
        return _Probe(name, module, s.act_bits, s.weight_bits, s.per_channel, s.grad.bits,
                      s.grad.wbits, s.grad.rounding, has_weight_grad=True,
                      quantized_gemm=True)
    if isinstance(module, QuantNormMixin) and module.q8_float_bn:
        return None  # BN in full precision: its input and g_l are not quantized
    if isinstance(module, QuantNormMixin):
        # timm's BatchNormAct2d applies its activation inside forward: the output hook would
        # see the gradient after the activation, not the g_l that q8 quantizes.
        plain = not isinstance(getattr(module, "act", None), nn.Module) or isinstance(
            module.act, nn.Identity)
        return _Probe(name, module, act_bits=module.q8_config.act_bits,
                      grad_bits=module.q8_grad.bits if plain else None,
                      rounding=module.q8_grad.rounding)
    if isinstance(module, (nn.Conv2d, nn.Linear)):  # full precision: gradient statistics only
        return _Probe(name, module, has_weight_grad=True)
    return None


def _fp32_weight_grad(module: nn.Module, x: Tensor, g: Tensor) -> Tensor | None:
    """dL/dW = x^T g_l in fp32 for a conv or linear layer; None where the geometry is unknown
    (e.g. a conv that pads inside its forward, as timm's Conv2dSame does)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
    x, padding = explicit_padding(x, module.padding, module.dilation, w.shape[-2:])
    if module.padding_mode != "zeros":
        return None
    try:
        return torch.ops.aten.convolution_backward(
            g.float(), x.float(), w.float(), None, module.stride, padding, module.dilation,
            False, [0, 0], module.groups, [False, True, False])[1]
    except RuntimeError:
        return None


class QuantStatsCallback(Callback):
    """Per-layer quantization error and gradient statistics of a q8 model, every N steps.

    log_every_n_steps: measure on optimizer steps that are multiples of it (0 disables).
    histogram_every_n_steps: also log histograms of g_l and g_W (W&B only; 0 disables).
    wgrad_cosine: the paper's diagnostic; keeps each layer's fp32 input until its backward.
    layers: fnmatch patterns of layer names to measure (None: every conv/linear/BN).
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        histogram_every_n_steps: int = 500,
        wgrad_cosine: bool = True,
        layers: list[str] | None = None,
        histogram_bins: int = 64,
    ) -> None:
        super().__init__()
        for key, v in (("log_every_n_steps", log_every_n_steps),
                       ("histogram_every_n_steps", histogram_every_n_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QuantStatsCallback.{key}={v!r} is invalid: use an integer "
                                 ">= 0 (0 disables)")
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.wgrad_cosine = wgrad_cosine
        self.layers = list(layers) if layers else None
        self.histogram_bins = histogram_bins
        self._probes: list[_Probe] = []
        self._handles: list[Any] = []
        self._step = -1  # the optimizer step being measured (once per step, when accumulating)
        self._histograms = False
        # a private stream for stochastic rounding (seeds are drawn on the CPU whatever the
        # device): measuring leaves training's random numbers alone
        self._generator = torch.Generator().manual_seed(0)
        self._warned: set[str] = set()
        self._layers_logged = False
        self._kept_out: set[str] = set()  # keys W&B keeps out of its summary

    # ---- when to measure

    def _wants(self, trainer: Trainer) -> bool:
        n, step = self.log_every_n_steps, trainer.global_step
        return (n > 0 and step % n == 0 and step != self._step and trainer.is_global_zero
                and bool(trainer.loggers))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._wants(trainer):
            return
        self._step = trainer.global_step
        k = self.histogram_every_n_steps
        self._histograms = k > 0 and self._step % k == 0 and bool(_wandb_loggers(trainer))
        self._attach(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._handles:
            return
        self._detach()
        try:
            self._log(trainer)
        finally:
            self._probes = []

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exc: BaseException
                     ) -> None:
        self._detach()
        self._probes = []

    # ---- hooks

    def _attach(self, pl_module: LightningModule) -> None:
        names = [n for n, _ in pl_module.named_modules() if n]
        strip = "model." if names and all(n == "model" or n.startswith("model.")
                                          for n in names) else ""
        for name, module in pl_module.named_modules():
            name = name[len(strip):] if strip and name.startswith(strip) else name
            if not name or (self.layers and not any(fnmatch.fnmatchcase(name, p)
                                                    for p in self.layers)):
                continue
            probe = _probe_for(name, module)
            if probe is None:
                continue
            self._probes.append(probe)
            self._handles.append(module.register_forward_hook(self._forward_hook(probe)))
            w = getattr(module, "weight", None)
            if probe.has_weight_grad and isinstance(w, Tensor) and w.requires_grad:
                self._handles.append(w.register_hook(self._weight_grad_hook(probe)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _guard(self, probe: _Probe, what: str, fn: Any, *args: Any) -> None:
        """Run a measurement; a failure is a warning, never a failed training step."""
        try:
            with torch.no_grad():
                fn(probe, *args)
        except Exception as ex:  # noqa: BLE001
            key = f"{probe.name}:{what}"
            if key not in self._warned:
                self._warned.add(key)
                log.warning("QuantStatsCallback: cannot measure %s of %s: %s", what,
                            probe.name, ex)

    def _forward_hook(self, probe: _Probe) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled() and args
                    and isinstance(args[0], Tensor)):
                return
            x = args[0]
            self._guard(probe, "forward", self._measure_forward, x)
            if isinstance(output, Tensor) and output.requires_grad:
                keep = x.detach() if self.wgrad_cosine and probe.quantized_gemm else None
                # the closure holds x only until this output's gradient arrives
                output.register_hook(lambda g: self._guard(probe, "g_l", self._measure_g, g,
                                                           keep))
        return hook

    def _weight_grad_hook(self, probe: _Probe) -> Any:
        def hook(grad: Tensor) -> None:
            self._guard(probe, "dL/dW", self._measure_weight_grad, grad)
        return hook

    # ---- measurements (0-d tensors; no host sync until the step ends)

    def _put(self, probe: _Probe, prefix: str, what: str, values: dict[str, Tensor]) -> None:
        for k, v in values.items():
            probe.values[f"{prefix}/{probe.name}/{what}_{k}"] = v

    def _measure_forward(self, probe: _Probe, x: Tensor) -> None:
        m = probe.module
        if probe.weight_bits is not None:
            dim = 0 if probe.per_channel else None
            self._put(probe, "quant", "weight", quant_error(m.weight, probe.weight_bits, dim=dim))
        if probe.act_bits is not None:
            dim = None if getattr(m, "q8_act_channels", None) is None else 1
            self._put(probe, "quant", "act", quant_error(x, probe.act_bits, dim=dim))
            running = getattr(m, "act_range", None)
            if running is not None:
                probe.values[f"quant/{probe.name}/act_eval_clip_frac"] = act_outside_frac(
                    x, running)

    def _measure_g(self, probe: _Probe, g: Tensor, x: Tensor | None) -> None:
        self._put(probe, "grads", "g", tensor_stats(g))
        if self._histograms:
            probe.hists[f"hist/{probe.name}/g"] = self._histogram(g)
        gen = self._generator
        if probe.grad_bits is not None:
            err = quant_error(g, probe.grad_bits, probe.rounding, generator=gen)
            self._put(probe, "quant", "grad", err)
            if probe.wgrad_bits == probe.grad_bits:  # one copy serves both paths
                self._put(probe, "quant", "wgrad", err)
        if probe.wgrad_bits is not None and probe.wgrad_bits != probe.grad_bits:
            self._put(probe, "quant", "wgrad",
                      quant_error(g, probe.wgrad_bits, probe.rounding, generator=gen))
        if x is not None:
            ref = _fp32_weight_grad(probe.module, x, g)
            if ref is not None:
                probe.ref_wgrad = ref if probe.ref_wgrad is None else probe.ref_wgrad + ref

    def _measure_weight_grad(self, probe: _Probe, grad: Tensor) -> None:
        self._put(probe, "grads", "wgrad", tensor_stats(grad))
        if self._histograms:
            probe.hists[f"hist/{probe.name}/wgrad"] = self._histogram(grad)
        if probe.ref_wgrad is not None and probe.ref_wgrad.shape == grad.shape:
            probe.values[f"quant/{probe.name}/wgrad_cosine"] = cosine(grad, probe.ref_wgrad)
        probe.ref_wgrad = None

    def _histogram(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x.detach().float().flatten()
        lo, hi = torch.aminmax(x)
        return torch.histc(x, self.histogram_bins, lo, hi), lo, hi

    # ---- logging

    def _log(self, trainer: Trainer) -> None:
        keys, values = [], []
        for probe in self._probes:
            keys += probe.values
            values += [v.float().reshape(()) for v in probe.values.values()]
        if not keys:
            return
        metrics = dict(zip(keys, torch.stack([v.to(values[0].device) for v in values])
                           .cpu().tolist()))
        hists = self._wandb_histograms() if self._histograms else {}
        if not self._layers_logged:  # W&B keeps no key order: record the network's order
            self._layers_logged = True
            layers = [p.name for p in self._probes]
            for logger in trainer.loggers:
                logger.log_hyperparams({LAYERS_KEY: layers})
        for logger in trainer.loggers:
            extra = hists if logger in _wandb_loggers(trainer) else {}
            if extra is hists:
                self._keep_out_of_summary(logger, list(metrics))
            logger.log_metrics({**metrics, **extra}, step=self._step)

    def _keep_out_of_summary(self, logger: Any, keys: list[str]) -> None:
        """Keep the per-layer scalars out of the W&B run's summary, so that its table and
        end-of-run printout show the run's own metrics (W&B keeps each histogram's last value
        there whatever define_metric says, and prints no histogram). One define_metric per
        key: the glob that Lightning's WandbLogger defines first ("*", plotted against
        trainer/global_step) would win over a glob such as "quant/*". A "." in a name means
        nesting to define_metric: the layer names' dots are escaped."""
        for key in keys:
            if key not in self._kept_out:
                self._kept_out.add(key)
                name = key.replace(".", "\\.")
                logger.experiment.define_metric(name, step_metric="trainer/global_step",
                                                step_sync=True, summary="none")

    def _wandb_histograms(self) -> dict[str, Any]:
        import wandb

        out = {}
        for probe in self._probes:
            for key, (counts, lo, hi) in probe.hists.items():
                lo_f, hi_f = float(lo), float(hi)
                if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
                    continue
                if hi_f <= lo_f:
                    hi_f = lo_f + 1e-12
                edges = torch.linspace(lo_f, hi_f, len(counts) + 1).tolist()
                out[key] = wandb.Histogram(np_histogram=(counts.cpu().tolist(), edges))
        return out


def _wandb_loggers(trainer: Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
