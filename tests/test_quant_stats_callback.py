"""QuantStatsCallback: its numbers against the maths, its hooks, and its keys in the CSV log
beside W&B (read back with q8.lit.run_history)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.quant_metrics import cosine, quant_error, sqnr_db
from callbacks.quant_stats import QuantStatsCallback
from q8 import QuantConfig, quantize_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


# ---------------------------------------------------------------- the measurements


def test_nearest_rounding_error_is_that_of_a_uniform_grid():
    n, bits = 200_000, 8
    x = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 - 1
    err = quant_error(x, bits)
    s = 2 / (2**bits - 2)  # q8's scale for the range [-1, 1]
    assert err["scale"].item() == pytest.approx(s, rel=1e-3)
    # e ~ U[-s/2, s/2]: E[e^2] = s^2/12, sd of the sample mean of e^2 = s^2 sqrt(1/80-1/144)/sqrt(n)
    tol = 5 * s**2 * math.sqrt(1 / 80 - 1 / 144) / math.sqrt(n)
    assert err["mse"].item() == pytest.approx(s**2 / 12, abs=tol)
    power = 1 / 3  # E[x^2] of U[-1, 1]
    assert err["sqnr_db"].item() == pytest.approx(10 * math.log10(power / (s**2 / 12)), abs=0.05)


def test_stochastic_rounding_error_variance_is_s2_over_6():
    # error given the fraction f of x/s: 1-f w.p. f, -f w.p. 1-f; E[e^2 | f] = f(1-f) s^2
    n, bits = 200_000, 6
    x = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 2 - 1
    err = quant_error(x, bits, "stochastic", generator=torch.Generator().manual_seed(2))
    s = err["scale"].item()
    assert err["mse"].item() == pytest.approx(s**2 / 6, rel=0.03)


def test_clip_frac_counts_values_at_the_range_ends():
    from q8.kernels.reference import qparams

    x = torch.linspace(-2, 2, 4001)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    frac = quant_error(x, 8, lo=lo, hi=hi)["clip_frac"].item()
    s, z = (v.item() for v in qparams(lo, hi, 8))
    # codes 0 and 255 take everything within s/2 of the grid's ends [-z s, (255 - z) s] or past
    ends = (x <= (-z + 0.5) * s) | (x >= (255 - z - 0.5) * s)
    assert frac == pytest.approx(ends.float().mean().item(), abs=2 / 4001)
    assert 0.49 < frac < 0.51
    assert quant_error(torch.rand(1000), 8)["clip_frac"].item() < 0.01


def test_zero_tensors_give_nan_not_errors():
    err = quant_error(torch.zeros(10), 8, "stochastic")
    assert math.isnan(err["sqnr_db"].item()) and err["mse"].item() == 0
    assert math.isnan(sqnr_db(torch.tensor(1.0), torch.tensor(0.0)).item())
    assert math.isnan(cosine(torch.zeros(3), torch.ones(3)).item())
    assert cosine(torch.ones(3), 2 * torch.ones(3)).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- a tiny training


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding="valid")
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class TinyModule(L.LightningModule):
    def __init__(self, quant: QuantConfig | None) -> None:
        super().__init__()
        self.model = TinyNet()
        if quant is not None:
            quantize_model(self.model, quant)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit_tiny(tmp_path: Path, quant: QuantConfig | None, callbacks: list, logger: str = "wandb",
             steps: int = 4, seed: int = 0) -> TinyModule:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    module = TinyModule(quant)
    if logger == "wandb":  # as conf/logger/wandb.yaml: W&B and the CSV log beside it
        loggers = [WandbLogger(save_dir=str(tmp_path), project="q8-test", name="tiny",
                               offline=True), CSVLogger(str(tmp_path), name="csv", version="")]
    elif logger == "csv":
        loggers = [CSVLogger(str(tmp_path), name="csv", version="")]
    else:
        loggers = []
    trainer = L.Trainer(max_steps=steps, logger=loggers or False, callbacks=callbacks,
                        accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=16))
    if logger == "wandb":
        import wandb

        wandb.finish()
    return module


def _csv_rows(tmp_path: Path) -> list[dict]:
    from q8.lit.run_history import read_history

    return read_history(tmp_path).to_dict("records")


def test_keys_reach_the_csv_log_and_histograms_reach_wandb(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from q8.lit.run_history import read_history, values

    sent: dict[str, dict[int, float]] = {}  # what W&B was given: key -> step -> value
    histograms: dict[int, set[str]] = {}  # step -> keys of the histograms W&B was given
    log_metrics = WandbLogger.log_metrics

    def spy(self, metrics, step=None):
        for k, v in metrics.items():
            if isinstance(v, wandb.Histogram):
                histograms.setdefault(step, set()).add(k)
            else:
                sent.setdefault(k, {})[step] = float(v)
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", spy)
    fit_tiny(tmp_path, QuantConfig(bn="range"), [QuantStatsCallback(log_every_n_steps=2,
                                                          histogram_every_n_steps=2)])
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1  # W&B wrote its run
    history = read_history(tmp_path)
    # the CSV holds every value the loggers were given, at its step, exactly
    assert {"train/loss", "quant/conv1/grad_sqnr_db", "grads/fc/wgrad_norm"} <= set(sent)
    for key, by_step in sent.items():
        assert dict(values(history, key)) == by_step, key
    assert list(values(history, "train/loss").index) == [0, 1, 2, 3]  # every step
    rows = history.dropna(subset=["quant/conv1/grad_sqnr_db"])
    assert list(rows["step"]) == [0, 2]  # logging steps only
    row = rows.iloc[-1].dropna()
    for layer in ("conv1", "conv2", "fc"):
        for what in ("weight", "act", "grad", "wgrad"):
            for stat in ("sqnr_db", "mse", "clip_frac", "scale"):
                assert f"quant/{layer}/{what}_{stat}" in row
        assert 0.99 < row[f"quant/{layer}/wgrad_cosine"] <= 1.0 + 1e-6
        for stat in ("norm", "mean", "std", "max_abs", "zero_frac"):
            assert f"grads/{layer}/wgrad_{stat}" in row and f"grads/{layer}/g_{stat}" in row
    # histograms go to W&B only, on histogram steps
    assert not any(col.startswith("hist/") for col in history)
    assert set(histograms) == {0, 2}
    assert histograms[2] == {"hist/bn1/g", *(f"hist/{layer}/{what}" for what in ("g", "wgrad")
                                             for layer in ("conv1", "conv2", "fc"))}
    # Range BN: its input and its 8-bit output gradient; it has no weight quantization
    assert "quant/bn1/act_sqnr_db" in row and "quant/bn1/grad_sqnr_db" in row
    assert "quant/bn1/weight_sqnr_db" not in row
    # 8-bit grids: SQNR near 6 dB per bit; the 16-bit g_W copy is far more precise
    assert 25 < row["quant/conv2/grad_sqnr_db"] < 60
    assert row["quant/conv2/wgrad_sqnr_db"] > row["quant/conv2/grad_sqnr_db"] + 30


def test_fp32_reference_gradient_matches_the_layer_exactly(tmp_path):
    # q8 layers with nothing quantized compute the fp32 gradient: the cosine must be 1, which
    # checks that the hooks capture this layer's own x and g_l
    # (bn="range" keeps quantize_model from skipping the model as full precision; the layers
    # checked are the conv and linear twins)
    fp32 = QuantConfig(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None,
                       bn="range")
    fit_tiny(tmp_path, fp32, [QuantStatsCallback(log_every_n_steps=1)], logger="csv", steps=2)
    rows = [r for r in _csv_rows(tmp_path) if r.get("quant/fc/wgrad_cosine") == r.get(
        "quant/fc/wgrad_cosine")]
    assert len(rows) == 2
    for layer in ("conv1", "conv2", "fc"):
        assert rows[-1][f"quant/{layer}/wgrad_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert f"quant/{layer}/grad_sqnr_db" not in rows[-1] or math.isnan(
            rows[-1][f"quant/{layer}/grad_sqnr_db"])


def test_hooks_are_removed_and_training_is_unchanged(tmp_path):
    plain = fit_tiny(tmp_path / "a", QuantConfig(), [], logger="csv")
    measured = fit_tiny(tmp_path / "b", QuantConfig(), [QuantStatsCallback(log_every_n_steps=1)],
                        logger="csv")
    # stochastic rounding draws the same numbers: measuring uses its own random stream
    for p, q in zip(plain.parameters(), measured.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for m in measured.modules():
        assert not m._forward_hooks
    for p in measured.parameters():
        assert not p._backward_hooks


def test_plain_layers_get_gradient_statistics_only(tmp_path):
    fit_tiny(tmp_path, None, [QuantStatsCallback(log_every_n_steps=1)], logger="csv", steps=1)
    keys = {k for r in _csv_rows(tmp_path) for k, v in r.items() if v == v}
    assert "grads/conv1/wgrad_norm" in keys and "grads/fc/g_std" in keys
    assert not any(k.startswith("quant/") for k in keys)


def test_nothing_is_measured_without_a_logger_or_between_intervals(tmp_path):
    cb = QuantStatsCallback(log_every_n_steps=3)
    attached = []
    cb._attach = lambda pl_module, _f=cb._attach: attached.append(1) or _f(pl_module)
    fit_tiny(tmp_path, QuantConfig(), [cb], logger="none", steps=4)
    assert attached == []
    fit_tiny(tmp_path, QuantConfig(), [cb], logger="csv", steps=4)
    assert len(attached) == 2  # steps 0 and 3


def test_invalid_interval_is_refused():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        QuantStatsCallback(log_every_n_steps=-1)


def test_config_file_builds_the_callback():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "callbacks" / "q8_stats.yaml")
    cb = instantiate(cfg.q8_stats)
    assert isinstance(cb, QuantStatsCallback) and cb.log_every_n_steps > 0


@pytest.mark.slow
def test_the_app_logs_per_layer_keys_and_compare_runs_reads_them(tiny_config, tmp_path,
                                                                capsys, load_script):
    from train import train

    run_dir = tmp_path / "run"
    train(tiny_config("logger=wandb", "callbacks=[model_checkpoint,q8_stats]",
                      "callbacks.q8_stats.log_every_n_steps=1", run_dir=run_dir))
    cr = load_script("compare_runs")
    (run,) = cr.load_local(run_dir)
    assert run.preset == "q8_bifurcated" and run.config[cr.LAYERS_KEY][0] == "conv1"
    assert {"quant/layer1.0.conv1/grad_sqnr_db", "quant/fc/wgrad_cosine",
            "grads/conv1/wgrad_norm"} <= set(run.history.columns)
    assert cr.main([str(run_dir), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "layers.png").is_file()
