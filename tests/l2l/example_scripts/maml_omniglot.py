"""learn2learn's examples/vision/maml_omniglot.py: MAML with OmniglotFC on the Omniglot
benchmark tasksets, support and query interleaved in each task."""

import numpy as np
import torch
from torch import nn, optim

import fastmeta.l2l as l2l

L2L_CALLS = [
    "l2l.vision.benchmarks.get_tasksets", "l2l.vision.models.OmniglotFC", "l2l.algorithms.MAML", "MAML.clone",
    "TaskDataset.sample", "clone.adapt",
]


def accuracy(predictions, targets):
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device):
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]
    for _ in range(adaptation_steps):
        learner.adapt(loss(learner(adaptation_data), adaptation_labels))
    predictions = learner(evaluation_data)
    return loss(predictions, evaluation_labels), accuracy(predictions, evaluation_labels)


def main(root, ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=4, adaptation_steps=1,
         num_iterations=2, seed=42):
    torch.manual_seed(seed)
    device = torch.device("cpu")
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot", train_ways=ways, train_samples=2 * shots, test_ways=ways, test_samples=2 * shots,
        num_tasks=200, root=root,
    )
    model = l2l.vision.models.OmniglotFC(28 ** 2, ways)
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")
    errors = []
    for _ in range(num_iterations):
        opt.zero_grad()
        meta_train_error = 0.0
        for _ in range(meta_batch_size):
            learner = maml.clone()
            batch = tasksets.train.sample()
            evaluation_error, _ = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device)
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            learner = maml.clone()
            batch = tasksets.validation.sample()
            fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device)
        errors.append(meta_train_error / meta_batch_size)
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
    for _ in range(meta_batch_size):
        learner = maml.clone()
        batch = tasksets.test.sample()
        fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device)
    return errors
