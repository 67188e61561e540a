"""How an experiment turns scores into what a user sees, as pure functions the service, the simulator and the
off-policy estimators share: salted-hash assignment, softmax exploration with inclusion propensities, and
team-draft interleaving.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

MC_DRAWS = 4000  # Monte Carlo lists behind each inclusion propensity (standard error <= 0.008)


def bucket(user_id: str, experiment: str, salt: str) -> float:
    """A user's fixed point in [0, 1) for this experiment and salt (SHA-256, so independent across salts)."""
    h = hashlib.sha256(f"{salt}\x1f{experiment}\x1f{user_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign(user_id: str, experiment: str, salt: str, arms: Sequence[tuple[str, float]]) -> str:
    """The arm ``user_id`` is in: the arm whose cumulative share first passes the user's bucket."""
    u, acc = bucket(user_id, experiment, salt), 0.0
    for name, share in arms:
        acc += share
        if u < acc:
            return name
    return arms[-1][0]


def request_rng(request_id: str) -> np.random.Generator:
    """Randomness tied to one request, so any of its draws can be replayed from the log."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big"))


def inclusion_probs(scores: np.ndarray, k: int, temperature: float | None, rng: np.random.Generator,
                    draws: int = MC_DRAWS) -> np.ndarray:
    """P(item in the shown top-k) for each candidate under a policy.

    Args:
        scores: (N,) the arm's candidate scores, best first or not.
        temperature: None for the greedy policy (top-k by score: 1 or 0), else the softmax temperature of a
            Plackett-Luce sample without replacement (sampled as the top-k of Gumbel-perturbed scores).
    Returns:
        (N,) inclusion probabilities (greedy: exact; softmax: Monte Carlo over ``draws`` lists).
    """
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    k = min(k, n)
    out = np.zeros(n)
    if temperature is None:
        out[np.argsort(-scores, kind="stable")[:k]] = 1.0
        return out
    if k == n:
        return np.ones(n)
    perturbed = scores[None, :] / temperature + rng.gumbel(size=(draws, n))
    top = np.argpartition(-perturbed, k - 1, axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=n) / draws


def softmax_sample(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Sample a k-list from the candidates (Plackett-Luce at ``temperature``).

    Returns:
        (k,) candidate positions in shown order and (k,) their inclusion propensities.
    """
    scores = np.asarray(scores, np.float64)
    k = min(k, len(scores))
    perturbed = scores / temperature + rng.gumbel(size=len(scores))
    order = np.argsort(-perturbed, kind="stable")[:k]
    probs = inclusion_probs(scores, k, temperature, rng)
    return order, np.maximum(probs[order], 1.0 / MC_DRAWS)  # a shown item was drawable: never 0


def team_draft(a: Sequence[str], b: Sequence[str], k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Team-draft interleaving (Radlinski et al. 2008) of two ranked lists into one of length k.

    The team with fewer picks picks next (a coin decides ties); it adds its highest-ranked item not yet in
    the list (a team that has run dry lets the other pick). Returns [(item, "a" or "b")] in shown order:
    the team that contributed each item, which is what gets the credit for a click.
    """
    lists, pos, count = {"a": list(a), "b": list(b)}, {"a": 0, "b": 0}, {"a": 0, "b": 0}
    out: list[tuple[str, str]] = []
    taken: set[str] = set()

    def next_of(team: str) -> str | None:
        lst = lists[team]
        while pos[team] < len(lst) and lst[pos[team]] in taken:
            pos[team] += 1
        return lst[pos[team]] if pos[team] < len(lst) else None

    while len(out) < k:
        first = "a" if count["a"] < count["b"] or (count["a"] == count["b"] and rng.random() < 0.5) else "b"
        for team in (first, "b" if first == "a" else "a"):
            item = next_of(team)
            if item is not None:
                out.append((item, team))
                taken.add(item)
                count[team] += 1
                break
        else:
            break  # both lists exhausted
    return out
