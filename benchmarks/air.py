"""Gradient variance of the credit assignments on Attend-Infer-Repeat (issue 17).

AIR (Eslami et al. 2016), written after the structure of Pyro's ``examples/air`` (an LSTM
guide that, per step ``t``, draws a presence ``z_pres_t ~ Bernoulli`` with a learned
baseline given as Pyro's ``infer={"baseline": {"baseline_value": ...}}`` annotation, a where
``z_where_t = (scale, x, y)`` and a what ``z_what_t``, masked once an earlier ``z_pres`` is 0;
a model that decodes each ``z_what`` into a window and places it on the canvas with a
spatial transformer), but small: canvases of 0-2 digits of scikit-learn's 8x8 ``digits``
on 20x20 pixels, 8x8 windows, 3 steps, offline.

For each loss (``TraceGraph_ELBO``, ``StorchELBO(credit="order")``,
``StorchELBO(credit="data_flow")``) ``--draws`` gradients at the same parameters, draw ``i``
under seed ``i`` for every loss (the losses draw the same samples under one seed, so the
comparison is paired), and per parameter group the total variance (sum over coordinates)
and its ratio to TraceGraph_ELBO's, with a standard error by the delta method over the
paired draws. Parameters are those at initialization, or after ``--train`` SVI steps of
TraceGraph_ELBO (so the baseline network has learned something). The ms/step column is
the median over ``--rounds`` interleaved rounds of 5 ``loss_and_grads`` calls per loss.

    python -m benchmarks.air --draws 500 --train 0 200
"""

import argparse
import math
import os
import time
from typing import Dict, List, Tuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceGraph_ELBO
from sklearn.datasets import load_digits
from torch import nn

import storch_pyro as storch

CANVAS, WINDOW, STEPS, Z_WHAT, HIDDEN = 20, 8, 3, 8, 64
# prior of z_where = (scale, x, y): the window is scaled up by ~CANVAS / WINDOW
WHERE_LOC = torch.tensor([CANVAS / WINDOW, 0.0, 0.0])
WHERE_SCALE = torch.tensor([0.2, 1.0, 1.0])


def multi_digits(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` canvases of 0, 1 or 2 digits (8x8, intensities in [0, 1]) at random places."""
    digits = torch.as_tensor(load_digits().data, dtype=torch.float32).view(-1, 8, 8) / 16.0
    generator = torch.Generator().manual_seed(seed)
    canvases = torch.zeros(n, CANVAS, CANVAS)
    counts = torch.randint(3, (n,), generator=generator)
    for i in range(n):
        for _ in range(int(counts[i])):
            digit = digits[int(torch.randint(len(digits), (), generator=generator))]
            row, col = torch.randint(CANVAS - 8 + 1, (2,), generator=generator).tolist()
            canvases[i, row:row + 8, col:col + 8] += digit
    return canvases.clamp(max=1.0)


def _affine(z_where: torch.Tensor) -> torch.Tensor:
    """``(scale, x, y)`` -> the 2x3 matrices ``[[scale, 0, x], [0, scale, y]]``."""
    scale, x, y = z_where.unbind(-1)
    zero = torch.zeros_like(scale)
    return torch.stack([scale, zero, x, zero, scale, y], -1).view(-1, 2, 3)


def _inverse(z_where: torch.Tensor) -> torch.Tensor:
    """The ``(scale, x, y)`` of the inverse transform: ``(1/scale, -x/scale, -y/scale)``."""
    scale, x, y = z_where.unbind(-1)
    return torch.stack([torch.ones_like(scale), -x, -y], -1) / scale.unsqueeze(-1)


def to_canvas(z_where: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    n = windows.size(0)
    grid = F.affine_grid(_affine(z_where), [n, 1, CANVAS, CANVAS], align_corners=False)
    out = F.grid_sample(windows.view(n, 1, WINDOW, WINDOW), grid, align_corners=False)
    return out.view(n, CANVAS, CANVAS)


def to_window(z_where: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    n = images.size(0)
    grid = F.affine_grid(_affine(_inverse(z_where)), [n, 1, WINDOW, WINDOW],
                         align_corners=False)
    out = F.grid_sample(images.view(n, 1, CANVAS, CANVAS), grid, align_corners=False)
    return out.view(n, WINDOW * WINDOW)


class AIR(nn.Module):
    """The model, the guide and their networks; ``groups`` names the parameter groups."""

    def __init__(self, likelihood_sd: float = 0.3) -> None:
        super().__init__()
        self.likelihood_sd = likelihood_sd
        state = CANVAS * CANVAS + 3 + Z_WHAT + 1
        self.rnn = nn.LSTMCell(state, HIDDEN)
        self.predict = nn.Linear(HIDDEN, 1 + 3 + 3)
        self.encode = nn.Sequential(nn.Linear(WINDOW * WINDOW, 64), nn.ReLU(),
                                    nn.Linear(64, 2 * Z_WHAT))
        self.decode = nn.Sequential(nn.Linear(Z_WHAT, 64), nn.ReLU(),
                                    nn.Linear(64, WINDOW * WINDOW))
        self.bl_rnn = nn.LSTMCell(state, HIDDEN)
        self.bl_predict = nn.Linear(HIDDEN, 1)
        with torch.no_grad():  # start near "present" and near the prior's scale
            self.predict.bias.zero_()
            self.predict.bias[0] = 2.0
            self.decode[-1].bias.fill_(-2.0)

    groups = {"guide (rnn, predict, encode)": ("rnn", "predict", "encode"),
              "decode": ("decode",), "baseline (bl_rnn, bl_predict)": ("bl_rnn", "bl_predict")}

    def model(self, data: torch.Tensor) -> None:
        pyro.module("decode", self.decode)
        n = data.size(0)
        with pyro.plate("data", n):
            canvas = data.new_zeros(n, CANVAS, CANVAS)
            present = data.new_ones(n, 1)
            for t in range(STEPS):
                present = pyro.sample(f"z_pres_{t}",
                                      dist.Bernoulli(0.5 * present).to_event(1))
                mask = present.bool()
                z_where = pyro.sample(
                    f"z_where_{t}",
                    dist.Normal(WHERE_LOC.expand(n, 3), WHERE_SCALE.expand(n, 3))
                    .mask(mask).to_event(1))
                z_what = pyro.sample(
                    f"z_what_{t}",
                    dist.Normal(data.new_zeros(n, Z_WHAT), 1.0).mask(mask).to_event(1))
                window = torch.sigmoid(self.decode(z_what))
                canvas = canvas + to_canvas(z_where, window) * present.view(n, 1, 1)
            pyro.sample("obs", dist.Normal(canvas.view(n, -1), self.likelihood_sd).to_event(1),
                        obs=data.view(n, -1))

    def guide(self, data: torch.Tensor) -> None:
        for name in ("rnn", "predict", "encode", "bl_rnn", "bl_predict"):
            pyro.module(name, getattr(self, name))
        n = data.size(0)
        with pyro.plate("data", n):
            flat = data.view(n, -1)
            h = c = bl_h = bl_c = data.new_zeros(n, HIDDEN)
            present = data.new_ones(n, 1)
            z_where = data.new_zeros(n, 3)
            z_what = data.new_zeros(n, Z_WHAT)
            for t in range(STEPS):
                h, c = self.rnn(torch.cat([flat, z_where, z_what, present], -1), (h, c))
                out = self.predict(h)
                p_pres = torch.sigmoid(out[:, :1])
                where_loc = out[:, 1:4] + WHERE_LOC
                where_scale = F.softplus(out[:, 4:7]) * WHERE_SCALE
                # the baseline net sees detached latents, so its loss trains it alone
                bl_input = torch.cat([flat, z_where.detach(), z_what.detach(),
                                      present.detach()], -1)
                bl_h, bl_c = self.bl_rnn(bl_input, (bl_h, bl_c))
                baseline = (self.bl_predict(bl_h) * present).squeeze(-1)
                present = pyro.sample(
                    f"z_pres_{t}", dist.Bernoulli(p_pres * present).to_event(1),
                    infer={"baseline": {"baseline_value": baseline}})
                mask = present.bool()
                z_where = pyro.sample(
                    f"z_where_{t}",
                    dist.Normal(where_loc, where_scale).mask(mask).to_event(1))
                loc, raw_scale = self.encode(to_window(z_where, data)).chunk(2, -1)
                z_what = pyro.sample(
                    f"z_what_{t}",
                    dist.Normal(loc, F.softplus(raw_scale) + 1e-3).mask(mask).to_event(1))


def losses() -> Dict[str, pyro.infer.ELBO]:
    return {
        "TraceGraph_ELBO": TraceGraph_ELBO(max_plate_nesting=1),
        "StorchELBO (credit='order')": storch.StorchELBO(max_plate_nesting=1),
        "StorchELBO (credit='data_flow')": storch.StorchELBO(max_plate_nesting=1,
                                                             credit="data_flow"),
    }


def train(air: AIR, data: torch.Tensor, steps: int, seed: int = 10**6) -> None:
    """``steps`` SVI steps of TraceGraph_ELBO (Adam, lr 1e-3)."""
    pyro.set_rng_seed(seed)
    svi = SVI(air.model, air.guide, pyro.optim.Adam({"lr": 1e-3}),
              TraceGraph_ELBO(max_plate_nesting=1))
    for _ in range(steps):
        svi.step(data)


def gradients(air: AIR, loss, data: torch.Tensor, draws: int
              ) -> Tuple[Dict[str, torch.Tensor], float]:
    """Per group, the ``draws`` flattened gradients (draw ``i`` under seed ``i``), and the
    median seconds per ``loss_and_grads``."""
    params = dict(air.named_parameters())
    out: Dict[str, List[torch.Tensor]] = {group: [] for group in AIR.groups}
    times = []
    for i in range(draws):
        pyro.set_rng_seed(i)
        air.zero_grad(set_to_none=False)
        start = time.perf_counter()
        loss.loss_and_grads(air.model, air.guide, data)
        times.append(time.perf_counter() - start)
        for group, prefixes in AIR.groups.items():
            out[group].append(torch.cat([
                p.grad.reshape(-1) for name, p in params.items()
                if name.split(".")[0] in prefixes]))
    return {g: torch.stack(v) for g, v in out.items()}, sorted(times)[draws // 2]


def timing(air: AIR, data: torch.Tensor, rounds: int, steps: int = 5) -> Dict[str, float]:
    """Median seconds per ``loss_and_grads`` of each loss, over interleaved rounds."""
    times: Dict[str, List[float]] = {name: [] for name in losses()}
    named = losses()
    for name, loss in named.items():  # warm-up (and the first step's validation)
        loss.loss_and_grads(air.model, air.guide, data)
    for _ in range(rounds):
        for name, loss in named.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss.loss_and_grads(air.model, air.guide, data)
            times[name].append((time.perf_counter() - start) / steps)
    air.zero_grad()
    return {name: sorted(ts)[rounds // 2] for name, ts in times.items()}


def variance_ratio(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """``tr Var(a) / tr Var(b)`` over paired draws (rows), and its delta-method s.e.:
    with :math:`u_i = \\|a_i - \\bar a\\|^2`, :math:`v_i = \\|b_i - \\bar b\\|^2`,
    :math:`R = \\bar u / \\bar v` and s.e.
    :math:`\\mathrm{sd}(u_i - R v_i) / (\\sqrt n\\,\\bar v)`."""
    u = (a - a.mean(0)).pow(2).sum(-1).double()
    v = (b - b.mean(0)).pow(2).sum(-1).double()
    ratio = float(u.mean() / v.mean())
    se = float((u - ratio * v).std() / (math.sqrt(len(u)) * v.mean()))
    return ratio, se


def measure(draws: int, train_steps: int, rounds: int, n_data: int = 32) -> dict:
    pyro.clear_param_store()
    torch.manual_seed(0)
    air = AIR()
    data = multi_digits(n_data)
    if train_steps:
        train(air, data, train_steps)
    results = {name: gradients(air, loss, data, draws)[0] for name, loss in losses().items()}
    seconds = timing(air, data, rounds)
    reference = results["TraceGraph_ELBO"]
    table = {}
    for name, grads in results.items():
        table[name] = {"ms": 1e3 * seconds[name],
                       **{g: variance_ratio(grads[g], reference[g]) for g in AIR.groups}}
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--train", type=int, nargs="+", default=[0, 200],
                        help="TraceGraph_ELBO SVI steps before measuring (one table each)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    for steps in args.train:
        table = measure(args.draws, steps, args.rounds)
        load = os.getloadavg()[0]
        print(f"\nAIR, {STEPS} steps, 32 canvases, {args.draws} paired draws, after {steps} "
              f"TraceGraph_ELBO steps; total gradient variance / TraceGraph_ELBO's (± s.e.); "
              f"load average {load:.1f}\n")
        print("| loss | ms/step | " + " | ".join(AIR.groups) + " |")
        print("|:--|--:|" + "--:|" * len(AIR.groups))
        for name, row in table.items():
            cells = " | ".join(f"{row[g][0]:.3f} ± {row[g][1]:.3f}" for g in AIR.groups)
            print(f"| {name} | {row['ms']:.1f} | {cells} |")


if __name__ == "__main__":
    main()
