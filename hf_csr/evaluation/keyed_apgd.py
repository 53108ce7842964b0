"""AutoAttack's APGD with random starts keyed per example (see :mod:`hf_csr.evaluation.sharding`).

pyautoattack's ``APGDAttack.perturb`` seeds torch's global generator once per call and draws the random
start of the whole batch with ``torch.rand(x.shape)`` (``torch.randn`` for L2): the start of an example
depends on which other examples share its batch, i.e. on the batch size, the number of processes and on
the examples an earlier component has already broken. Everything else APGD does is per example (the
step-size schedule, the checkpoints, the best iterate; APGD-T's target classes come from the example's own
clean logits), so the start is the only thing to change.

These subclasses follow ``perturb`` of ``APGDAttack`` and ``APGDAttack_targeted`` (restarts, and for
APGD-T the ``n_target_classes`` rounds, each on the examples not yet broken) and hand pyautoattack's own
``attack_single_run`` a start made as it makes it -- ``x + eps * normalize(t)`` with ``t`` uniform in
[-1, 1] (Linf) or standard normal (L2) -- but with ``t`` drawn from keys of ``(seed, component, round,
example index)``. The iterations themselves are pyautoattack's. Only Linf and L2 are handled (hf_csr's
threat models); the ``rand`` version (EOT over a randomised model) keeps pyautoattack's own perturb.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from .sharding import example_keys, keyed_normal, keyed_uniform

__all__ = ["KeyedAPGD", "KeyedAPGDTargeted", "key_examples"]


def key_examples(attack, *, seed: int, stream: str, indices: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """Give ``attack`` the examples of the next ``perturb`` call: their dataset indices and the chunk."""
    attack.keyed = {"seed": int(seed), "stream": stream, "indices": indices.cpu(), "x": x, "y": y}


class _Keyed:
    keyed: Optional[dict] = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset indices of the rows of ``x``: AutoAttack passes the chunk's clean-correct examples."""
        info = self.keyed
        indices = info["indices"]
        if len(x) != len(indices):
            # AutoAttack's own clean check (one forward of the whole chunk) dropped some examples
            with torch.no_grad():
                correct = self.model(info["x"].to(self.device)).max(1)[1].cpu() == info["y"].cpu()
            indices = indices[correct]
            if len(indices) != len(x):
                raise RuntimeError(
                    "cannot match AutoAttack's batch to its examples: the model's predictions change from one "
                    "forward to the next (a randomised model?); evaluate it with autoattack_version='rand'."
                )
        return indices

    def _start(self, x: torch.Tensor, indices: torch.Tensor, round_: str) -> torch.Tensor:
        """pyautoattack's random start ``x + eps * normalize(t)``, with ``t`` keyed per example."""
        keys = example_keys(self.keyed["seed"], f"{self.keyed['stream']}/{round_}", indices).to(x.device)
        shape = tuple(x.shape[1:])
        if self.norm == "Linf":
            t = 2 * keyed_uniform(keys, shape) - 1
        elif self.norm == "L2":
            t = keyed_normal(keys, shape)
        else:  # pragma: no cover - hf_csr's threat models are Linf and L2
            raise ValueError(f"keyed APGD starts support Linf and L2, not {self.norm}.")
        return x + self.eps * self.normalize(t.to(x.dtype))

    def _prepare(self, x, y):
        self.init_hyperparam(x)
        x = x.detach().clone().float().to(self.device)
        y = y.detach().clone().long().to(self.device)
        with torch.no_grad():
            acc = self.model(x).max(1)[1] == y
        torch.random.manual_seed(self.seed)  # as pyautoattack: only a randomised model draws from it now
        return x, y, acc

    def _attack(self, x, y, acc, adv, indices, round_):
        todo = acc.nonzero().squeeze(1)
        if todo.numel() == 0:
            return
        x_todo, y_todo = x[todo], y[todo]
        if isinstance(self, APGDAttack_targeted):
            with torch.no_grad():
                self.y_target = self.model(x_todo).sort(dim=1)[1][:, -round_[0]]
        start = self._start(x_todo, indices[todo.cpu()], "/".join(map(str, round_)))
        _, acc_curr, _, adv_curr = self.attack_single_run(x_todo, y_todo, x_init=start)
        fooled = (acc_curr == 0).nonzero().squeeze(1)
        acc[todo[fooled]] = False
        adv[todo[fooled]] = adv_curr[fooled].clone()


class KeyedAPGD(_Keyed, APGDAttack):
    """APGD-CE / APGD-DLR with per-example random starts (``keyed`` set by :func:`key_examples`)."""

    def perturb(self, x, y=None, best_loss=False, x_init=None):
        if self.keyed is None or best_loss or y is None or self.use_largereps or x_init is not None:
            return super().perturb(x, y, best_loss=best_loss, x_init=x_init)
        x, y, acc = self._prepare(x, y)
        indices, adv = self._rows(x), x.clone()
        for restart in range(self.n_restarts):
            self._attack(x, y, acc, adv, indices, (0, restart))
        return adv


class KeyedAPGDTargeted(_Keyed, APGDAttack_targeted):
    """APGD-T with per-example random starts; its target rounds as pyautoattack's (runner-up classes)."""

    def perturb(self, x, y=None, x_init=None):
        if self.keyed is None or y is None or self.use_largereps or x_init is not None:
            return super().perturb(x, y, x_init=x_init)
        x, y, acc = self._prepare(x, y)
        indices, adv = self._rows(x), x.clone()
        for target_class in range(2, self.n_target_classes + 2):
            for restart in range(self.n_restarts):
                self._attack(x, y, acc, adv, indices, (target_class, restart))
        return adv
