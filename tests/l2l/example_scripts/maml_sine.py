"""learn2learn's examples/maml_sine.py: MAML on sine regression (a 3-layer MLP, 5 steps).
The original reads its tasks from torchmeta; here they are drawn with torch."""

import torch
from torch import nn, optim

import fastmeta.l2l as l2l

L2L_CALLS = ["l2l.algorithms.MAML", "MAML.clone", "clone.adapt"]


class SineModel(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.hidden1 = nn.Linear(1, dim)
        self.hidden2 = nn.Linear(dim, dim)
        self.hidden3 = nn.Linear(dim, 1)

    def forward(self, x):
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)


def sine_batches(iterations, tasks_per_batch, samples, generator):
    for _ in range(iterations):
        amplitude = torch.rand(tasks_per_batch, 1, 1, generator=generator) * 4.9 + 0.1
        phase = torch.rand(tasks_per_batch, 1, 1, generator=generator) * torch.pi
        x = torch.rand(tasks_per_batch, samples, 1, generator=generator) * 10 - 5
        yield x, amplitude * torch.sin(x + phase)


def main(shots=5, tasks_per_batch=4, iterations=3, adapt_lr=0.01, meta_lr=0.001, adapt_steps=5, hidden_dim=16,
         seed=0):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SineModel(dim=hidden_dim)
    maml = l2l.algorithms.MAML(model, lr=adapt_lr, first_order=False, allow_unused=True)
    opt = optim.Adam(maml.parameters(), meta_lr)
    lossfn = nn.MSELoss(reduction="mean")
    losses = []
    for batch in sine_batches(iterations, tasks_per_batch, 2 * shots, generator):
        meta_train_loss = 0.0
        effective_batch_size = batch[0].shape[0]
        for i in range(effective_batch_size):
            learner = maml.clone()
            train_inputs, train_targets = batch[0][i].float(), batch[1][i].float()
            x_support, y_support = train_inputs[::2], train_targets[::2]
            x_query, y_query = train_inputs[1::2], train_targets[1::2]
            for _ in range(adapt_steps):
                support_loss = lossfn(learner(x_support), y_support)
                learner.adapt(support_loss)
            meta_train_loss += lossfn(learner(x_query), y_query)
        meta_train_loss = meta_train_loss / effective_batch_size
        losses.append(meta_train_loss.item())
        opt.zero_grad()
        meta_train_loss.backward()
        opt.step()
    return losses
