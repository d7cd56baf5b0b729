"""learn2learn's examples/rl/metasgd_a2c.py: Meta-SGD with an A2C inner loss. The gym
environment (``l2l.gym.AsyncVectorEnv`` over Particles2D) is a synthetic one here."""

import torch
from torch import optim

import fastmeta.l2l as l2l

from .rl_common import DiagNormalPolicy, SyntheticNavigationEnv, a2c_loss

L2L_CALLS = ["l2l.algorithms.MetaSGD", "MetaSGD.clone", "clone.adapt"]
SUBSTITUTED = {"l2l.gym.AsyncVectorEnv": "SyntheticNavigationEnv: gym is not a dependency"}


def main(adapt_lr=0.1, meta_lr=0.01, adapt_steps=1, num_iterations=2, meta_bsz=3, adapt_bsz=2, gamma=0.99, seed=42):
    torch.manual_seed(seed)
    env = SyntheticNavigationEnv(seed=seed)
    policy = DiagNormalPolicy(env.state_size, env.action_size)
    meta_learner = l2l.algorithms.MetaSGD(policy, lr=meta_lr)
    opt = optim.Adam(meta_learner.parameters(), lr=meta_lr)
    rewards = []
    for _ in range(num_iterations):
        iteration_loss, iteration_reward = 0.0, 0.0
        for task_config in env.sample_tasks(meta_bsz):
            learner = meta_learner.clone()
            env.set_task(task_config)
            for _ in range(adapt_steps):
                train_episodes = env.run(learner, episodes=adapt_bsz)
                learner.adapt(a2c_loss(train_episodes, learner, gamma))
            valid_episodes = env.run(learner, episodes=adapt_bsz)
            iteration_loss += a2c_loss(valid_episodes, learner, gamma)
            iteration_reward += valid_episodes.rewards.sum().item() / adapt_bsz
        rewards.append(iteration_reward / meta_bsz)
        opt.zero_grad()
        (iteration_loss / meta_bsz).backward()
        opt.step()
    return rewards, meta_learner
