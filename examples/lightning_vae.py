"""The discrete VAE of ``distributed_vae.py`` trained by PyTorch Lightning's DDP strategy, as
Pyro's ``examples/svi_lightning.py`` trains its models: the model and guide are
``PyroModule`` s (``module_local_params=True``), ``StorchELBO()(model, guide)`` is the loss
module, and Lightning wraps the ``LightningModule`` in ``DistributedDataParallel`` (which
averages the gradients of the encoder, the decoder and the estimators' networks) and shards
the data with a ``DistributedSampler``. ``StorchELBO`` finds the process group Lightning
initialized and synchronizes the estimators' state over it (``MovingAverage``), with no
extra code.

Needs the optional extra: ``pip install -e ".[distributed]"`` (Lightning; it must not
replace your torch: ``pip install --no-deps lightning==2.6.6 pytorch-lightning==2.6.6
lightning-utilities torchmetrics PyYAML`` where it would).

    python examples/lightning_vae.py                 # 2 CPU processes (Trainer devices=2)
    python examples/lightning_vae.py --smoke         # a few steps
    python examples/lightning_vae.py --num-nodes 2   # with torchrun-style environment
                                                     # (MASTER_ADDR, NODE_RANK) on each node

Prints, on rank 0, the held-out negative ELBO per image and the throughput.
"""

import argparse
import time
import warnings

import pyro
import torch
from distributed_vae import Guide, Model, load_digits
from torch.utils.data import DataLoader, TensorDataset

import storch_pyro as storch

# Lightning's advice (dataloader workers, logging intervals) is not needed here.
warnings.filterwarnings(
    "ignore", category=UserWarning,
    module=r"(lightning|pytorch_lightning|lightning_fabric|lightning_utilities)(\.|$)")

import lightning  # noqa: E402  (after the warning filters)


class VAE(lightning.LightningModule):
    """Pyro's Lightning pattern: the loss module's parameters are the module's."""

    def __init__(self, size: int, estimator: str, lr: float) -> None:
        super().__init__()
        self.model, self.guide = Model(size), Guide(size, estimator)
        self.loss_fn = storch.StorchELBO(max_plate_nesting=1)(self.model, self.guide)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, index = batch
        loss = self.loss_fn(x, index)
        self.log("train_loss", loss / len(index), prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.loss_fn.parameters(), lr=self.lr)


class Throughput(lightning.Callback):
    """Steps/s after the first (validating, warming-up) step."""

    def __init__(self) -> None:
        self.start, self.steps = None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.steps += 1
        self.seconds = time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", default="moving-average",
                        choices=["rloo", "moving-average", "learned", "relax", "disarm"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--devices", type=int, default=2, help="processes per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    args = parser.parse_args()

    pyro.settings.set(module_local_params=True)
    lightning.seed_everything(0, verbose=False)  # the same initial parameters everywhere
    train, test = load_digits(torch.device("cpu"))
    data = TensorDataset(train, torch.arange(len(train)))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    vae = VAE(len(train), args.estimator, args.lr)
    throughput = Throughput()
    trainer = lightning.Trainer(
        strategy="ddp", accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes,
        max_steps=5 if args.smoke else args.steps, max_epochs=-1, callbacks=[throughput],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(vae, loader)

    state = {name: float(value.detach().sum()) for name, value in
             pyro.get_param_store().items() if name.startswith("storch_pyro.")}
    states = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    assert all(other == state for other in states), states  # the same on every rank
    if trainer.global_rank == 0:
        with torch.no_grad():
            vae.model.size = vae.guide.size = len(test)
            evaluation = storch.StorchELBO(max_plate_nesting=1, num_particles=4)
            index = torch.arange(len(test))
            test_loss = evaluation.loss(vae.model, vae.guide, test, index) / len(test)
        world = trainer.world_size
        seconds = getattr(throughput, "seconds", float("nan"))
        steps = max(throughput.steps, 1)
        print("| processes | estimator | steps | held-out -ELBO/image | steps/s | samples/s |")
        print("|---|---|---|---|---|---|")
        print(f"| {world} | {args.estimator} | {trainer.global_step} | {test_loss:.2f} | "
              f"{steps / seconds:.1f} | {steps * args.batch_size * world / seconds:.0f} |")


if __name__ == "__main__":
    main()
