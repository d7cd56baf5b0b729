"""learn2learn's examples/rl/maml_trpo.py: MAML-TRPO with ``l2l.clone_module`` and
``l2l.algorithms.maml.maml_update``. The gym environment is a synthetic one here, and the
TRPO step (cherry's conjugate gradient) is a plain step along the gradient with the same
KL-bounded line search."""

from copy import deepcopy

import torch
from torch import autograd
from torch.distributions.kl import kl_divergence

import fastmeta.l2l as l2l

from .rl_common import DiagNormalPolicy, SyntheticNavigationEnv, a2c_loss, advantages

L2L_CALLS = ["l2l.algorithms.maml.maml_update", "l2l.clone_module"]
SUBSTITUTED = {"l2l.gym.AsyncVectorEnv": "SyntheticNavigationEnv: gym is not a dependency"}


def fast_adapt_a2c(clone, train_episodes, adapt_lr, gamma, first_order=False):
    second_order = not first_order
    loss = a2c_loss(train_episodes, clone, gamma)
    gradients = autograd.grad(loss, clone.parameters(), retain_graph=second_order, create_graph=second_order)
    return l2l.algorithms.maml.maml_update(clone, adapt_lr, gradients)


def meta_surrogate_loss(iteration_replays, iteration_policies, policy, gamma, adapt_lr):
    mean_loss, mean_kl = 0.0, 0.0
    for task_replays, old_policy in zip(iteration_replays, iteration_policies):
        new_policy = l2l.clone_module(policy)
        for train_episodes in task_replays[:-1]:
            new_policy = fast_adapt_a2c(new_policy, train_episodes, adapt_lr, gamma, first_order=False)
        valid = task_replays[-1]
        old_densities = old_policy.density(valid.states)
        new_densities = new_policy.density(valid.states)
        mean_kl += kl_divergence(new_densities, old_densities).mean()
        adv = advantages(valid, gamma)
        old_log_probs = old_densities.log_prob(valid.actions).mean(dim=1, keepdim=True).detach()
        new_log_probs = new_densities.log_prob(valid.actions).mean(dim=1, keepdim=True)
        mean_loss += -(torch.exp(new_log_probs - old_log_probs) * adv).mean()
    return mean_loss / len(iteration_replays), mean_kl / len(iteration_replays)


def main(adapt_lr=0.1, meta_lr=1.0, adapt_steps=1, num_iterations=2, meta_bsz=3, adapt_bsz=2, gamma=0.95, seed=42,
         max_kl=0.01, ls_max_steps=5):
    torch.manual_seed(seed)
    env = SyntheticNavigationEnv(seed=seed)
    policy = DiagNormalPolicy(env.state_size, env.action_size)
    accepted = []
    for _ in range(num_iterations):
        iteration_replays, iteration_policies = [], []
        for task_config in env.sample_tasks(meta_bsz):
            clone = deepcopy(policy)
            env.set_task(task_config)
            task_replay = []
            for _ in range(adapt_steps):
                train_episodes = env.run(clone, episodes=adapt_bsz)
                clone = fast_adapt_a2c(clone, train_episodes, adapt_lr, gamma, first_order=True)
                task_replay.append(train_episodes)
            task_replay.append(env.run(clone, episodes=adapt_bsz))
            iteration_replays.append(task_replay)
            iteration_policies.append(clone)
        old_loss, old_kl = meta_surrogate_loss(iteration_replays, iteration_policies, policy, gamma, adapt_lr)
        step = [g.detach() for g in autograd.grad(old_loss, policy.parameters())]
        old_loss = old_loss.detach()
        taken = False
        for ls_step in range(ls_max_steps):
            stepsize = 0.5 ** ls_step * meta_lr
            clone = deepcopy(policy)
            with torch.no_grad():
                for p, u in zip(clone.parameters(), step):
                    p.add_(u, alpha=-stepsize)
            new_loss, kl = meta_surrogate_loss(iteration_replays, iteration_policies, clone, gamma, adapt_lr)
            if new_loss < old_loss and kl < max_kl:
                with torch.no_grad():
                    for p, u in zip(policy.parameters(), step):
                        p.add_(u, alpha=-stepsize)
                taken = True
                break
        accepted.append(taken)
    return accepted, policy
