"""learn2learn's examples/maml_toy.py: MAML fits the parameters of Normal distributions.

The original's ``dist.Normal(self.mu, self.sigma)`` with ``sigma = randn(5)`` fails on
current torch, with or without fastmeta: distributions check their arguments by default
(torch 1.8 on) and a negative scale is refused. The mirror passes ``validate_args=False``,
which is what the original ran with on the torch it was written for."""

import torch as th
from torch import distributions as dist
from torch import nn, optim

import fastmeta.l2l as l2l

L2L_CALLS = ["l2l.algorithms.MAML", "MAML.clone", "clone.adapt"]
DIM = 5


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(th.randn(DIM))
        self.sigma = nn.Parameter(th.randn(DIM))

    def forward(self, x=None):
        return dist.Normal(self.mu, self.sigma, validate_args=False)


def main(timesteps=3, tasks_per_step=5, seed=0):
    th.manual_seed(seed)
    task_dist = dist.Normal(th.zeros(2 * DIM), th.ones(2 * DIM))
    model = Model()
    maml = l2l.algorithms.MAML(model, lr=1e-2)
    opt = optim.Adam(maml.parameters())
    losses = []
    for _ in range(timesteps):
        step_loss = 0.0
        for _ in range(tasks_per_step):
            task_params = task_dist.sample()
            mu_i, sigma_i = task_params[:DIM], task_params[DIM:]
            learner = maml.clone()
            proposal = learner()
            loss = (mu_i - proposal.mean).pow(2).sum() + (sigma_i - proposal.variance).pow(2).sum()
            learner.adapt(loss)
            adapt_loss = (mu_i - proposal.mean).pow(2).sum() + (sigma_i - proposal.variance).pow(2).sum()
            step_loss += adapt_loss
        step_loss = step_loss / tasks_per_step
        losses.append(step_loss.item())
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    return losses
