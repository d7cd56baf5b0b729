"""learn2learn's examples/vision/mamlpp/ (maml++_miniimagenet.py, MAMLpp.py,
cnn4_bnrs.py): MAML++ written by the user on learn2learn's BaseLearner and utilities,
with per-layer per-step rates and per-step BatchNorm statistics, on miniImageNet tasksets."""

from collections import namedtuple

import torch
from torch.autograd import grad

import fastmeta.l2l as l2l

L2L_CALLS = [
    "l2l.vision.benchmarks.get_tasksets", "BaseLearner.__init__", "TaskDataset.sample", "l2l.utils.clone_module",
    "l2l.utils.clone_named_parameters",
]

MetaBatch = namedtuple("MetaBatch", "support query")


def maml_pp_update(model, step=None, lrs=None, grads=None):
    if grads is not None and lrs is not None:
        for (name, p), g in zip(model.named_parameters(), grads):
            if g is not None:
                p.grad = g
                p._lr = lrs[name[: name.rfind(".")].replace(".", "-")][step]
    for key, p in model._parameters.items():
        if p is not None and p.grad is not None:
            model._parameters[key] = p - p._lr * p.grad
            p.grad = None
            p._lr = None
    for key in model._modules:
        model._modules[key] = maml_pp_update(model._modules[key])
    return model


class MAMLpp(l2l.algorithms.base_learner.BaseLearner):
    def __init__(self, model, lr, lrs=None, adaptation_steps=1, first_order=False, allow_unused=None,
                 allow_nograd=False):
        super().__init__()
        self.module = model
        self.lr = lr
        if lrs is None:
            lrs = torch.nn.ParameterDict()
            for layer_name, layer in model.named_modules():
                if any(p.requires_grad for p in layer.parameters(recurse=False)):
                    lrs[layer_name.replace(".", "-")] = torch.nn.Parameter(torch.ones(adaptation_steps) * lr)
        self.lrs = lrs
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def adapt(self, loss, step=None, first_order=None):
        first_order = self.first_order if first_order is None else first_order
        diff_params = [p for p in self.module.parameters() if p.requires_grad]
        grad_params = iter(grad(loss, diff_params, retain_graph=not first_order, create_graph=not first_order,
                                allow_unused=self.allow_unused))
        gradients = [next(grad_params) if p.requires_grad else None for p in self.module.parameters()]
        self.module = maml_pp_update(self.module, step, lrs=self.lrs, grads=gradients)

    def clone(self):
        return MAMLpp(l2l.utils.clone_module(self.module), lr=self.lr, lrs=l2l.utils.clone_named_parameters(self.lrs),
                      first_order=self.first_order, allow_unused=self.allow_unused, allow_nograd=self.allow_nograd)


class StepBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm with running statistics per inner step (cnn4_bnrs's idea, in small)."""

    def __init__(self, channels, steps):
        super().__init__(channels)
        self.register_buffer("step_mean", torch.zeros(steps, channels))
        self.register_buffer("step_var", torch.ones(steps, channels))

    def forward(self, x, step):
        return torch.nn.functional.batch_norm(x, self.step_mean[step], self.step_var[step], self.weight, self.bias,
                                              True, 0.1, self.eps)


class CNN4BNRS(torch.nn.Module):
    def __init__(self, ways, adaptation_steps, hidden=8, image=16):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, hidden, 3, padding=1)
        self.bn1 = StepBatchNorm(hidden, adaptation_steps)
        self.conv2 = torch.nn.Conv2d(hidden, hidden, 3, padding=1)
        self.bn2 = StepBatchNorm(hidden, adaptation_steps)
        self.head = torch.nn.Linear(hidden * (image // 4) ** 2, ways)

    def forward(self, x, step):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x), step)), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x), step)), 2)
        return self.head(x.flatten(1))


def split_batch(batch, k_shots, n_queries):
    images, labels = batch
    indices = torch.randperm(k_shots + n_queries)
    return MetaBatch((images[indices[:k_shots]], labels[indices[:k_shots]]),
                     (images[indices[k_shots:]], labels[indices[k_shots:]]))


def main(root, ways=5, k_shots=2, n_queries=3, steps=2, meta_bsz=2, iterations=2, fast_lr=0.01, meta_lr=0.001,
         seed=42):
    torch.manual_seed(seed)
    train_tasks, valid_tasks, test_tasks = l2l.vision.benchmarks.get_tasksets(
        "mini-imagenet", train_samples=k_shots + n_queries, train_ways=ways, test_samples=k_shots + n_queries,
        test_ways=ways, root=root, data_augmentation="normalize",
    )
    model = CNN4BNRS(ways, adaptation_steps=steps)
    maml = MAMLpp(model, lr=fast_lr, adaptation_steps=steps, first_order=False, allow_nograd=True)
    opt = torch.optim.AdamW(maml.parameters(), meta_lr, betas=(0.0, 0.999))  # the original's (0, 0.999): refused by current torch
    criterion = torch.nn.CrossEntropyLoss(reduction="mean")
    step_weights = torch.ones(steps) / steps
    losses = []
    for _ in range(iterations):
        opt.zero_grad()
        total = 0.0
        for _ in range(meta_bsz):
            batch = split_batch(train_tasks.sample(), k_shots * ways, n_queries * ways)
            learner = maml.clone()
            (s_x, s_y), (q_x, q_y) = batch
            query_loss = torch.tensor(0.0)
            for step in range(steps):
                learner.adapt(criterion(learner(s_x, step), s_y), step=step)
                query_loss = query_loss + step_weights[step] * criterion(learner(q_x, step), q_y)
            query_loss.backward()
            total += query_loss.item()
        losses.append(total / meta_bsz)
        opt.step()
    return losses, maml
