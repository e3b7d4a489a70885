"""Skip-GANomaly training step: anomaseg against the official code (samet-akcay/skip-ganomaly), side
by side in one process, at equal settings (image size, batch, channels, fp32, the paper's losses).

The official code is not part of anomaseg and nothing is fetched at run time: pass a local checkout,

    git clone https://github.com/samet-akcay/skip-ganomaly /tmp/skip-ganomaly
    python benchmarks/bench_skipganomaly.py --official /tmp/skip-ganomaly [--repeats 5] [--steps 2]

Without `--official` (or if the path holds no lib/models/networks.py) the official row is skipped.

The official row imports the checkout's `lib/models/networks.py` (its UnetGenerator and
BasicDiscriminator, built by its define_G / define_D with their initialisation) and replays the
update of its `Skipganomaly.optimize_params` (lib/models/skipganomaly.py): the generator's
reconstruction, the discriminator on real and reconstructed images, the generator update on
w_adv * BCE(D(x_hat), 1) + w_con * L1 + w_lat * L2(f(x_hat), f(x)), then the discriminator update on
BCE(D(x), 1) + BCE(D(x_hat.detach()), 0) + the latent term, re-initialising the discriminator when
its loss falls under 1e-5; Adam lr 2e-4, betas (0.5, 0.999), sigmoid + BCELoss as in the official
code. Departures, each the minimum that lets it run on torch 2.x:
- the generator input `input + noise` uses zeros for `noise` (the official code adds an unfilled
  `torch.empty` tensor, as `set_input` is called without noise);
- the discriminator's backward is restricted to its own parameters (`inputs=`): its loss contains
  the latent term, whose graph runs back into the generator, whose weights the generator's Adam
  step has just changed in place. torch >= 1.5 stops there ("one of the variables needed for
  gradient computation has been modified by an inplace operation"); torch 1.2, which the code
  pins, did not check, and the generator gradients it wrote were zeroed before their next use, so
  the discriminator's gradients are exactly the official ones.
No other patch is needed: networks.py imports nothing but torch and numpy.

Our rows run `SkipGANomaly.training_step` (models/skip_ganomaly.py): the paper's losses and
weights, discriminator update first, then the generator against the updated discriminator:
- ours_fp32_reference_layout: contiguous tensors, torch.optim.Adam (the official settings);
- ours_fp32: + fused Adam (anomaseg's optimiser);
- ours_fp32_cl: + channels_last (NHWC), which `train.channels_last: auto` leaves off for
  Skip-GANomaly on a CPU, where it was slower; ours_fp32 is therefore anomaseg's default on a CPU
  without bf16 units;
- ours_bf16, ours_bf16_cl: bf16 autocast, without and with channels_last (only where `--precision
  auto` picks bf16: CPUs/GPUs with bf16 units).
The JSON's `default_row` names the row of anomaseg's defaults here (`--precision auto`,
`channels_last: auto`, fused Adam).
Rows are interleaved and repeated; medians and ratios against the official row of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `anomaseg` command does (bench_threads.py); before torch loads
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from anomaseg import runtime  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.models import create_model  # noqa: E402
from anomaseg.models.skip_ganomaly import SkipGANomaly  # noqa: E402
from anomaseg.training import training_memory_format  # noqa: E402
from bench_speed import convolution_share, machine_info, set_threads, synchronize  # noqa: E402

LR, BETAS = 2e-4, (0.5, 0.999)
W_ADV, W_CON, W_LAT = 1.0, 50.0, 1.0


def load_official_networks(checkout: Path) -> types.ModuleType:
    path = checkout / "lib" / "models" / "networks.py"
    spec = importlib.util.spec_from_file_location("skipganomaly_official_networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_step(networks: types.ModuleType, size: int, batch: int, base: int, device: str):
    """The official update (see the module docstring), as a function of a batch."""
    opt = types.SimpleNamespace(isize=size, nc=1, nz=100, ngf=base, ndf=base, ngpu=1, extralayers=0, gpu_ids=[])
    torch.manual_seed(0)
    netg = networks.define_G(opt, norm="batch", use_dropout=False, init_type="normal").to(device).train()
    netd = networks.define_D(opt, norm="batch", use_sigmoid=False, init_type="normal").to(device).train()
    optimizer_g = torch.optim.Adam(netg.parameters(), lr=LR, betas=BETAS)
    optimizer_d = torch.optim.Adam(netd.parameters(), lr=LR, betas=BETAS)
    bce, l1 = nn.BCELoss(), nn.L1Loss()
    real_label = torch.ones(batch, device=device)
    fake_label = torch.zeros(batch, device=device)
    noise = torch.zeros(batch, 1, size, size, device=device)

    def step(x: torch.Tensor) -> None:
        fake = netg(x + noise)  # forward_g
        pred_real, feat_real = netd(x)  # forward_d
        pred_fake, feat_fake = netd(fake)
        optimizer_g.zero_grad()  # update_netg
        err_g_lat = W_LAT * torch.mean(torch.pow(feat_fake - feat_real, 2))
        err_g = W_ADV * bce(pred_fake, real_label) + W_CON * l1(fake, x) + err_g_lat
        err_g.backward(retain_graph=True)
        optimizer_g.step()
        optimizer_d.zero_grad()  # update_netd
        pred_fake_d, _ = netd(fake.detach())
        err_d = bce(pred_real, real_label) + bce(pred_fake_d, fake_label) + err_g_lat
        err_d.backward(retain_graph=True, inputs=list(netd.parameters()))  # the one departure (docstring)
        optimizer_d.step()
        if err_d < 1e-5:
            netd.apply(networks.weights_init)

    return step, torch.contiguous_format


def ours_step(size: int, batch: int, base: int, top: int, device: str, precision: str, channels_last: bool,
              fused: bool):
    torch.manual_seed(0)
    model = create_model("skip_ganomaly", in_channels=1, image_size=size, base_channels=base, max_channels=top)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).train()
    if fused:
        optimizers = model.make_optimizers(LR, BETAS)
    else:
        optimizers = {"generator": torch.optim.Adam(model.generator.parameters(), lr=LR, betas=BETAS),
                      "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=LR, betas=BETAS)}
    fabric_precision = runtime.fabric_precision(precision, device)

    def autocast():
        return runtime.autocast(device, fabric_precision) if fabric_precision != "32-true" else contextlib.nullcontext()

    def step(x: torch.Tensor) -> None:
        model.training_step(x, optimizers, lambda loss: loss.backward(), autocast)

    return step, memory_format


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, default=None, help="local checkout of samet-akcay/skip-ganomaly")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--base-channels", type=int, default=64, help="ngf = ndf of the official code")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS, else all CPUs)")
    ap.add_argument("--out", default=None, help="default: results/skipganomaly_<device>.json")
    args = ap.parse_args()
    device = runtime.default_device() if args.device == "auto" else args.device
    set_threads(args.threads)
    size, batch, base = args.size, args.batch_size, args.base_channels
    top = 8 * base  # the official UnetGenerator's inner width is ngf * 8
    here = {"bf16-mixed": "bf16", "32-true": "32", "16-mixed": "16"}[runtime.fabric_precision("auto", device)]

    steps = {}
    official = args.official
    if official is not None and (official / "lib" / "models" / "networks.py").is_file():
        steps["official_fp32"] = official_step(load_official_networks(official), size, batch, base, device)
    else:
        print(f"no official checkout at {official} (lib/models/networks.py): the official row is skipped", flush=True)
        official = None
    steps["ours_fp32_reference_layout"] = ours_step(size, batch, base, top, device, "32", False, False)
    steps["ours_fp32"] = ours_step(size, batch, base, top, device, "32", False, True)
    steps["ours_fp32_cl"] = ours_step(size, batch, base, top, device, "32", True, True)
    if here != "32":
        steps[f"ours_{here}"] = ours_step(size, batch, base, top, device, here, False, True)
        steps[f"ours_{here}_cl"] = ours_step(size, batch, base, top, device, here, True, True)
    nhwc = training_memory_format(SkipGANomaly, "auto", device) == torch.channels_last
    default_row = "ours_" + ("fp32" if here == "32" else here) + ("_cl" if nhwc else "")

    x_all = torch.rand(4 * batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    counter = [0]

    def measure(step, memory_format, n: int) -> float:
        synchronize(device)
        t = time.perf_counter()
        for _ in range(n):
            i = counter[0] % 4
            counter[0] += 1
            step(x_all[i * batch:(i + 1) * batch].contiguous(memory_format=memory_format))
        synchronize(device)
        return n * batch / (time.perf_counter() - t)

    load_before = os.getloadavg()
    print(f"device {device}; {size} px, batch {batch}, channels {base}/{top}; --precision auto picks {here}; "
          f"{torch.get_num_threads()} threads; load average {load_before[0]:.1f}", flush=True)
    for step, memory_format in steps.values():  # warm-up
        measure(step, memory_format, 1)
    samples = {k: [] for k in steps}
    for r in range(args.repeats):
        for name, (step, memory_format) in steps.items():
            samples[name].append(measure(step, memory_format, args.steps))
            print(f"repeat {r + 1}: {name} {samples[name][-1]:.2f} img/s (load {os.getloadavg()[0]:.1f})", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ref = med.get("official_fp32")
    batch0 = x_all[:batch]
    conv_share = {k: convolution_share(lambda: steps[k][0](batch0.contiguous(memory_format=steps[k][1])), device, 2)
                  for k in ("official_fp32", "ours_fp32") if k in steps}
    report = {"size": size, "batch_size": batch, "channels": [base, top], "steps": args.steps,
              "repeats": args.repeats, "auto_precision_here": here, "official_checkout": str(official) if official else None,
              "default_row": default_row, "images_per_second": med, "samples": samples,
              "convolution_share": conv_share,
              "ratio_vs_official": {k: v / ref for k, v in med.items()} if ref else None,
              "machine": machine_info(device), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out) if args.out else ROOT / "results" / f"skipganomaly_{device}.json"
    write_text(out, json.dumps(report, indent=1))
    cpu = report["machine"]["cpu"]
    print(f"\n{cpu['model']} ({', '.join(cpu['key_flags'])}); load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    for k, v in med.items():
        print(f"{k}: {v:.2f} img/s" + (f" ({v / ref:.2f}x official)" if ref else "")
              + (" <- default" if k == default_row else ""))
    print("convolutions: " + ", ".join(f"{v:.0%} of the {k} step's operator time" for k, v in conv_share.items()))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
