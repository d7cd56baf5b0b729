"""learn2learn's examples/vision/anil_fc100.py: ANIL (MAML on the head only) over FC100,
with the datasets and task transforms built by hand. The original's transform is
torchvision's ToTensor; here a function does the same."""

import numpy as np
import torch
from torch import nn

import fastmeta.l2l as l2l

L2L_CALLS = [
    "l2l.vision.datasets.FC100", "l2l.data.MetaDataset", "l2l.data.transforms.FusedNWaysKShots",
    "l2l.data.transforms.LoadData", "l2l.data.transforms.RemapLabels", "l2l.data.transforms.ConsecutiveLabels",
    "l2l.data.Taskset", "l2l.vision.models.ConvBase", "l2l.algorithms.MAML", "MAML.clone", "TaskDataset.sample",
    "clone.adapt",
]


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float() / 255.0


def fast_adapt(batch, learner, features, loss, adaptation_steps, shots, ways, device=None):
    data, labels = batch
    data = features(data.to(device))
    labels = labels.to(device)
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    for _ in range(adaptation_steps):
        learner.adapt(loss(learner(data[adaptation_indices]), labels[adaptation_indices]))
    predictions = learner(data[evaluation_indices])
    return loss(predictions, labels[evaluation_indices])


def main(root, ways=5, shots=1, meta_lr=0.001, fast_lr=0.1, adapt_steps=2, meta_bsz=3, iters=2, seed=42):
    from fastmeta.l2l.data import transforms as T

    torch.manual_seed(seed)
    device = torch.device("cpu")
    datasets = {mode: l2l.vision.datasets.FC100(root=root, transform=to_tensor, mode=mode)
                for mode in ("train", "validation", "test")}
    datasets = {mode: l2l.data.MetaDataset(d) for mode, d in datasets.items()}
    tasks = {}
    for mode, dataset in datasets.items():
        task_transforms = [
            T.FusedNWaysKShots(dataset, n=ways, k=2 * shots),
            T.LoadData(dataset),
            T.RemapLabels(dataset),
            T.ConsecutiveLabels(dataset),
        ]
        tasks[mode] = l2l.data.Taskset(dataset, task_transforms=task_transforms, num_tasks=50)
    features = l2l.vision.models.ConvBase(output_size=64, channels=3, max_pool=True)
    features = torch.nn.Sequential(features, Lambda(lambda x: x.view(-1, 256)))
    head = torch.nn.Linear(256, ways)
    head = l2l.algorithms.MAML(head, lr=fast_lr)
    all_parameters = list(features.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(all_parameters, lr=meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")
    errors = []
    for _ in range(iters):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(meta_bsz):
            learner = head.clone()
            error = fast_adapt(tasks["train"].sample(), learner, features, loss, adapt_steps, shots, ways, device)
            error.backward()
            total += error.item()
            learner = head.clone()
            fast_adapt(tasks["validation"].sample(), learner, features, loss, adapt_steps, shots, ways, device)
        errors.append(total / meta_bsz)
        for p in all_parameters:
            p.grad.data.mul_(1.0 / meta_bsz)
        optimizer.step()
    return errors
