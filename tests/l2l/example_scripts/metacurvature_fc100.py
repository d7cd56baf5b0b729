"""learn2learn's examples/vision/metacurvature_fc100.py: GBML with the Meta-Curvature
transform on FC100 tasksets."""

import numpy as np
import torch

import fastmeta.l2l as l2l

L2L_CALLS = [
    "l2l.vision.benchmarks.get_tasksets", "l2l.vision.models.ConvBase", "l2l.nn.Lambda", "l2l.nn.Flatten",
    "l2l.vision.models.maml_init_", "l2l.algorithms.GBML", "GBML.clone", "TaskDataset.sample", "GBML.adapt",
]
# Used without being called by the script: GBML calls it on each parameter.
L2L_PASSED = ["l2l.optim.transforms.MetaCurvatureTransform"]


class CifarCNN(torch.nn.Module):
    def __init__(self, output_size=5, hidden_size=32, layers=4):
        super().__init__()
        self.hidden_size = hidden_size
        features = l2l.vision.models.ConvBase(hidden=hidden_size, channels=3, max_pool=False, layers=layers,
                                              max_pool_factor=0.5)
        self.features = torch.nn.Sequential(features, l2l.nn.Lambda(lambda x: x.mean(dim=[2, 3])), l2l.nn.Flatten())
        self.linear = torch.nn.Linear(self.hidden_size, output_size, bias=True)
        l2l.vision.models.maml_init_(self.linear)

    def forward(self, x):
        return self.linear(self.features(x))


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device):
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    for _ in range(adaptation_steps):
        learner.adapt(loss(learner(data[adaptation_indices]), labels[adaptation_indices]))
    predictions = learner(data[evaluation_indices])
    return loss(predictions, labels[evaluation_indices])


def main(root, fast_lr=0.1, meta_lr=0.01, num_iterations=2, meta_batch_size=3, adaptation_steps=2, shots=1, ways=5,
         hidden_size=8, seed=1234):
    torch.manual_seed(seed)
    device = torch.device("cpu")
    tasksets = l2l.vision.benchmarks.get_tasksets(
        name="fc100", train_samples=2 * shots, train_ways=ways, test_samples=2 * shots, test_ways=ways, root=root,
    )
    model = CifarCNN(output_size=ways, hidden_size=hidden_size)
    model.to(device)
    gbml = l2l.algorithms.GBML(model, transform=l2l.optim.transforms.MetaCurvatureTransform, lr=fast_lr,
                               adapt_transform=False)
    gbml.to(device)
    opt = torch.optim.Adam(gbml.parameters(), meta_lr)
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    errors = []
    for _ in range(num_iterations):
        opt.zero_grad()
        total = 0.0
        for _ in range(meta_batch_size):
            learner = gbml.clone()
            error = fast_adapt(tasksets.train.sample(), learner, loss, adaptation_steps, shots, ways, device)
            error.backward()
            total += error.item()
        errors.append(total / meta_batch_size)
        for p in gbml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
    return errors, gbml
