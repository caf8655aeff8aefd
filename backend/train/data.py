"""The data order of training: seeded, resumable and sharded over ranks, independent of worker timing.

    DrawSchedule(n_items, *, seed, rank=0, world_size=1)   resumable, seeded, sharded order of items
    DrawSampler(schedule) / SeededDraws(dataset)           that order through a DataLoader, reseeded per draw
    next_batch(draw, schedule, batch_size, *, on_empty)    a batch of the draws that are usable
"""

from __future__ import annotations

import torch


class DrawSchedule:
    """Seeded, resumable stream of item indices: each epoch is a permutation of ``range(n_items)``
    drawn from ``seed + epoch`` and sharded round-robin over ranks. ``next()`` returns
    ``(item_index, draw_id)``; ``draw_id`` is globally unique and can seed the random transforms of that
    draw, so the data a run sees depends only on (seed, position), not on worker timing.
    """

    def __init__(self, n_items: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if n_items < 1:
            raise ValueError("DrawSchedule needs at least one item")
        self.n_items, self.seed, self.rank, self.world_size = n_items, seed, rank, world_size
        self.epoch = 0
        self.position = 0  # index into this rank's shard of the current epoch
        self._order: list[int] | None = None

    def _shard(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n_items, generator=g).tolist()
            while len(perm) % self.world_size:  # equal shards on every rank
                perm.append(perm[len(perm) % self.n_items])
            self._order = perm[self.rank :: self.world_size]
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        shard = self._shard()
        if self.position >= len(shard):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            shard = self._shard()
        item = shard[self.position]
        draw_id = ((self.epoch * len(shard) + self.position) * self.world_size + self.rank) + self.seed * 1_000_003
        self.position += 1
        return item, draw_id

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": self.n_items}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None

    def seek(self, n_draws: int) -> DrawSchedule:
        """Position the stream after ``n_draws`` draws of this rank (the state a run had after them)."""
        shard_len = -(-self.n_items // self.world_size)
        self.epoch, self.position = divmod(int(n_draws), shard_len)
        self._order = None
        return self


class DrawSampler(torch.utils.data.Sampler):
    """Endless DataLoader sampler over a :class:`DrawSchedule`: yields ``(item, draw_id)`` keys for
    :class:`SeededDraws`. The DataLoader reads ahead, so a trainer resumes with
    ``DrawSchedule.seek(draws consumed by its steps)``, not with the schedule's own position."""

    def __init__(self, schedule: DrawSchedule):
        self.schedule = schedule

    def __iter__(self):
        while True:
            yield next(self.schedule)


class SeededDraws(torch.utils.data.Dataset):
    """A MONAI dataset read through :class:`DrawSampler` keys: before each item its random transforms
    are reseeded from the draw id, so what a step sees depends only on (seed, position) — not on the
    number of workers, their timing, or where a run was interrupted and resumed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        item, draw_id = key
        self.dataset.transform.set_random_state(seed=draw_id % 2**32)
        return self.dataset[item]


def next_batch(draw, schedule: DrawSchedule, batch_size: int, *, exhausted) -> list:
    """``batch_size`` results of ``draw(item, draw_id)`` over the next draws of ``schedule``; a draw that
    returns None (an unusable case) is skipped. ``exhausted()`` is asked after each skip and returns the
    error to raise when no case is usable at all (else None)."""
    out = []
    while len(out) < batch_size:
        item, draw_id = next(schedule)
        got = draw(item, draw_id)
        if got is not None:
            out.append(got)
        else:
            error = exhausted()
            if error is not None:
                raise error
    return out
