"""What the RL examples take from gym and cherry, in small: a synthetic 2-D navigation
environment (each task a goal, as Particles2D), a diagonal-Gaussian policy, rollouts,
discounted returns and a linear baseline."""

from collections import namedtuple

import torch
from torch import nn
from torch.distributions import Normal

Episodes = namedtuple("Episodes", "states actions rewards dones next_states")


class SyntheticNavigationEnv:
    """Stands in for ``l2l.gym.AsyncVectorEnv([make_env ...])`` of Particles2D: a point moves
    by its action; the reward is minus the distance to the task's goal."""

    state_size = 2
    action_size = 2

    def __init__(self, horizon=8, seed=0):
        self.horizon = horizon
        self.generator = torch.Generator().manual_seed(seed)
        self.goal = torch.zeros(2)

    def sample_tasks(self, count):
        return [torch.rand(2, generator=self.generator) * 2 - 1 for _ in range(count)]

    def set_task(self, goal):
        self.goal = goal

    def run(self, policy, episodes):
        states, actions, rewards, dones, next_states = [], [], [], [], []
        for _ in range(episodes):
            state = torch.zeros(2)
            for t in range(self.horizon):
                with torch.no_grad():
                    action = policy.density(state[None]).sample()[0].clamp(-0.5, 0.5)
                next_state = state + action
                states.append(state)
                actions.append(action)
                rewards.append(-(next_state - self.goal).norm()[None])
                dones.append(torch.tensor([float(t == self.horizon - 1)]))
                next_states.append(next_state)
                state = next_state
        return Episodes(*(torch.stack(x) for x in (states, actions, rewards, dones, next_states)))


class DiagNormalPolicy(nn.Module):
    def __init__(self, input_size, output_size, hiddens=(16,)):
        super().__init__()
        layers, size = [], input_size
        for h in hiddens:
            layers += [nn.Linear(size, h), nn.Tanh()]
            size = h
        layers.append(nn.Linear(size, output_size))
        self.mean = nn.Sequential(*layers)
        self.sigma = nn.Parameter(torch.full((output_size,), -1.0))

    def density(self, state):
        return Normal(self.mean(state), self.sigma.exp())

    def log_prob(self, state, action):
        return self.density(state).log_prob(action).mean(dim=1, keepdim=True)

    def forward(self, state):
        return self.density(state).sample()


def advantages(episodes, gamma):
    returns, running = torch.zeros_like(episodes.rewards), torch.zeros(1)
    for t in reversed(range(episodes.rewards.size(0))):
        running = episodes.rewards[t] + gamma * running * (1.0 - episodes.dones[t])
        returns[t] = running
    features = torch.cat([episodes.states, torch.ones(episodes.states.size(0), 1)], dim=1)
    weights = torch.linalg.lstsq(features, returns).solution  # the linear baseline
    adv = returns - features @ weights
    return ((adv - adv.mean()) / (adv.std() + 1e-8)).detach()


def a2c_loss(episodes, learner, gamma):
    return -(learner.log_prob(episodes.states, episodes.actions) * advantages(episodes, gamma)).mean()
