"""The built-in flows and HMC on a CUDA device against the CPU.

Skipped unless a CUDA device is present (``benchmarks/gpu_run.sh`` runs it on a lent GPU
machine); ``FLOWPLUG_TEST_DEVICE=cpu`` runs it on the CPU instead, to check the tests.

For each example configuration's flow (shrunk to a small lattice and few layers), one set of
weights on the CPU and on the device: the same prior draws give the same configurations and
log-densities (float32 conditioners with TF32 off: to 1e-4 of the log-density's scale), the
inverse flow on the device returns the draws and their log-densities, and a training step
there gives a finite loss. On the device, as on the CPU, each configuration of a batch mapped
by the flow inverts alone to float64 rounding (DESIGN section 4: the inverse of one
configuration sees exactly the parameters of the batched forward map), with torch's default
TF32 settings and with TF32 off. HMC on the device is reversible and conserves energy at a small
step size (Duane et al., Phys. Lett. B 195 (1987) 216).
"""

from __future__ import annotations

import os

import pytest
import torch

from flowplug.config import build_config
from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.train import build_trainer

_CHOICE = os.environ.get("FLOWPLUG_TEST_DEVICE", "")
if not _CHOICE and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (or FLOWPLUG_TEST_DEVICE=cpu)", allow_module_level=True)
DEVICE = torch.device(_CHOICE or "cuda")
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

#: example -> overrides that make it small
CASES = {
    "train_phi4.toml": ["flow.n_layers=4"],
    "train_u1.toml": ["flow.n_layers=4"],
    "train_u1_multiscale.toml": ["flow.n_layers=4", "flow.options.hidden=[8]"],
    "train_schwinger.toml": ["flow.n_layers=2", "flow.options.hidden=[8]"],
    "train_su2.toml": ["flow.n_layers=4", "lattice=[4, 4]"],
    "train_su3.toml": ["flow.n_layers=4", "lattice=[4, 4]"],
    "train_su3_4d.toml": ["flow.n_layers=2"],
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 products on the device (TF32 would move float32 conditioners by ~1e-3)."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _config(example, *extra):
    overrides = [*CASES[example], "train.progress=false", "train.batch_size=8", "threads=1", "seed=3", *extra]
    return build_config(
        DEFAULT_CONFIG, config_file=os.path.join(EXAMPLES, example), overrides=overrides, open_tables=OPEN_TABLES
    )


@pytest.mark.parametrize("example", sorted(CASES))
def test_flow_on_the_device_matches_the_cpu_and_inverts(example):
    cfg = _config(example)
    cpu = build_trainer(cfg, device="cpu")
    dev = build_trainer(cfg, device=str(DEVICE))
    cpu.out = dev.out = None
    with torch.no_grad():
        for p in cpu.flow.parameters():  # away from the identity the layers start at
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    dev.flow.load_state_dict(cpu.flow.state_dict())
    flow_c, flow_d = cpu.flow.eval(), dev.flow.eval()
    with torch.no_grad():
        z, log_r = flow_c.sample_latent(6, torch.Generator().manual_seed(11))
        x_c, ld_c = flow_c(z)
        x_d, ld_d = flow_d(z.to(DEVICE))
        scale = 1.0 + float(ld_c.abs().max())
        assert float((x_d.cpu() - x_c).abs().max()) < 1e-4 * (1.0 + float(x_c.abs().max()))
        assert float((ld_d.cpu() - ld_c).abs().max()) < 1e-4 * scale
        z_back, ld_inv = flow_d.inverse(x_d)
        assert float((z_back.cpu() - z).abs().max()) < 1e-6 * (1.0 + float(z.abs().max()))
        assert float((ld_inv + ld_d).abs().max()) < 1e-6 * scale
        lq = flow_d.log_prob(x_d)
        assert float((lq.cpu() - (log_r - ld_c)).abs().max()) < 1e-4 * scale
    metrics = dev.train_step()
    assert metrics and all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values() if isinstance(v, float))
    assert all(p.device.type == DEVICE.type for p in dev.flow.parameters())
    if DEVICE.type == "cuda":  # flowplug.flow.place_flow: float64 networks on CUDA
        assert all(p.dtype == torch.float64 for p in dev.flow.parameters())


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("net", ["float32", "float64"])
@pytest.mark.parametrize("example", sorted(CASES))
def test_each_configuration_of_a_batch_inverts_alone_on_the_device(example, net, tf32):
    """Batch 16 forward, then the inverse of configurations 0, 5 and 15 one at a time: cuBLAS
    and cuDNN may choose kernels by batch size, so this is checked on the device itself."""
    if DEVICE.type == "cuda":  # the autouse fixture turned TF32 off; this test chooses
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    cfg = _config(example, f"flow.options.dtype='{net}'")
    cpu = build_trainer(cfg, device="cpu")
    dev = build_trainer(cfg, device=str(DEVICE))
    cpu.out = dev.out = None
    with torch.no_grad():
        for p in cpu.flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    dev.flow.load_state_dict(cpu.flow.state_dict())
    flow = dev.flow.eval()
    with torch.no_grad():
        z, _ = cpu.flow.sample_latent(16, torch.Generator().manual_seed(12))
        z = z.to(DEVICE)
        x, logdet = flow(z)
        worst_z = worst_ld = 0.0
        for i in (0, 5, 15):
            z_i, ld_inv = flow.inverse(x[i : i + 1])
            worst_z = max(worst_z, float((z_i - z[i : i + 1]).abs().max()))
            worst_ld = max(worst_ld, abs(float(logdet[i] + ld_inv[0])))
    assert worst_z < 1e-12 and worst_ld < 1e-10, (
        f"{example} {net} tf32={tf32}: |dz| {worst_z:.3g}, |dlogdet| {worst_ld:.3g}"
    )


@pytest.mark.parametrize("group", ["u1", "su3"])
def test_hmc_on_the_device_is_reversible_and_conserves_energy(group):
    act = WilsonGaugeAction(2.0, group)
    lattice = (8, 8) if group == "u1" else (4, 4, 4, 4)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    x0 = act.hot_start(lattice, 4, generator=g, device=DEVICE)
    hmc = HMC(act, integrator="omelyan", steps=20, trajectory_length=0.2)
    space = hmc.space
    p0 = space.momenta(x0, g)
    x1, p1 = hmc.integrate(x0, p0)
    x2, p2 = hmc.integrate(x1, -p1)
    assert float((x2 - x0).abs().max()) < 1e-9 and float((p2 + p0).abs().max()) < 1e-9
    h0 = space.kinetic(p0) + act.action(x0)
    h1 = space.kinetic(p1) + act.action(x1)
    assert float((h1 - h0).abs().max()) < 1e-3 * float(h0.abs().max()) ** 0.5
    assert x1.device.type == DEVICE.type
