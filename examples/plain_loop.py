"""A plain PyTorch loop on the embedded digits data, wrapped with dx.DeMem.

Run: python examples/plain_loop.py   (about 10 seconds on 2 CPU cores)
Epoch 1-2 use the weighting path (PGD-AT + DeMem); epoch 3 the per-sample path with clipping and
noise. Each epoch prints the last step's DeMem statistics.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import demem_ext as dx
from demem_ext.adversarial import pgd
from demem_ext.training.data import load_digits


def main() -> None:
    torch.manual_seed(0)
    train_set, test_set, _ = load_digits()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    print(f"demem_ext backend: {dx.backend()}")

    with dx.DeMem(model, optimizer, lam=0.5, threshold="mean", k=1.0) as dm:  # weighting path
        for epoch in range(2):
            for x, y, _ in loader:
                x_adv = pgd(model, x, y, eps=0.1, alpha=0.025, steps=5)
                losses = F.cross_entropy(model(x_adv), y, reduction="none")
                optimizer.zero_grad()
                dm.backward(losses)
                optimizer.step()
            s = dm.stats
            print(f"epoch {epoch + 1} (weighting): high-risk fraction {s.high_risk_fraction:.2f}, "
                  f"weights min {s.weights.min():.2f} max {s.weights.max():.2f}")

    def loss_fn(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(x), y, reduction="none")

    with dx.DeMem(model, optimizer, lam=0.5, max_grad_norm=1.0, noise_multiplier=0.5,
                  num_samples=len(train_set), expected_batch_size=64) as dm:  # per-sample path
        for x, y, _ in loader:
            x_adv = pgd(model, x, y, eps=0.1, alpha=0.025, steps=5)
            optimizer.zero_grad()
            dm.backward_per_sample(loss_fn, x_adv, y)
            optimizer.step()
        s = dm.stats
        print(f"epoch 3 (per-sample): high-risk fraction {s.high_risk_fraction:.2f}, clip fraction "
              f"{s.clip_fraction:.2f}, median grad norm {s.norms.median():.2f}")
        epsilon, reason = dm.privacy_spent(delta=1e-5)
        print(f"privacy_spent: epsilon={epsilon} ({reason})")

    xs, ys = test_set.inputs, test_set.targets
    with torch.no_grad():
        natural = (model(xs).argmax(1) == ys).float().mean()
    robust = (model(pgd(model, xs, ys, eps=0.1, alpha=0.0125, steps=20)).argmax(1) == ys).float().mean()
    print(f"test accuracy: natural {natural:.3f}, PGD-20 {robust:.3f}")


if __name__ == "__main__":
    main()
