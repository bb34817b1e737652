"""Many cameras on Ray: workers (Ray actors) each hold one converted model and the cameras
placed on them (`CameraBatch`); a `Router`, in the client, keeps each camera on its worker
(its caches live there), places a new camera on the least-loaded worker, checkpoints every
camera every `checkpoint_every` answered frames, and moves the cameras of a worker that died to
the others, from their last checkpoint, or from a dense step when it is older than
`max_checkpoint_age` frames (counted as a failover refresh). Frames a dead worker never
answered are sent again to the camera's new worker, so no frame is dropped silently or
answered twice. Ray is imported only here (`pip install eventful[serve]`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eventful.core.drift import DEFAULT_DRIFT, DriftControl
from eventful.core.policies import Policy, TopFraction
from eventful.serve.camera_batch import CameraBatch, FrameResult


@dataclass(frozen=True)
class ModelSpec:
    """How each worker builds its model: a model name of `eventful.zoo` (or hf:DIR) at input
    side `size`, converted with `policy` at `level` and `precision`."""

    name: str
    size: int | None = None
    policy: Policy = field(default_factory=lambda: TopFraction(0.25))
    level: str = "exact"
    precision: str = "fp32"

    def build(self):
        from eventful.convert import convert
        from eventful.zoo import load_model

        dense = load_model(self.name, self.size).dense
        return convert(dense, self.policy, self.level, precision=self.precision)


class Worker:
    """What one Ray actor runs: a `CameraBatch` on its own copy of the model, with `threads`
    torch threads (None: torch's own)."""

    def __init__(
        self,
        spec: ModelSpec,
        max_pending: int,
        drift: DriftControl | None,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.cameras = CameraBatch(spec.build(), max_pending, drift)

    def add(self, camera: Hashable, snapshot: dict | None = None) -> None:
        self.cameras.add(camera, snapshot)

    def remove(self, camera: Hashable) -> dict:
        return self.cameras.remove(camera)

    def snapshot(self, camera: Hashable) -> dict:
        return self.cameras.snapshot(camera)

    def run(self, frames: list[tuple[Hashable, int, Tensor]]) -> list[FrameResult]:
        """Queue `frames` (camera, sequence, frame) and run until none waits."""
        for camera, sequence, frame in frames:
            self.cameras.submit(camera, sequence, frame)
        results = []
        while self.cameras.pending():
            results += self.cameras.step()
        return results

    def process_id(self) -> int:
        return os.getpid()


class Router:
    """Cameras served by `workers` Ray actors (Ray must be initialised, `ray.init`), each
    with `worker_threads` torch threads."""

    def __init__(
        self,
        spec: ModelSpec,
        workers: int = 2,
        checkpoint_every: int = 30,
        max_checkpoint_age: int = 120,
        max_pending: int = 2,
        drift: DriftControl | None = DEFAULT_DRIFT,
        worker_threads: int | None = None,
    ) -> None:
        import ray

        for name, value in (
            ("workers", workers),
            ("checkpoint_every", checkpoint_every),
            ("max_checkpoint_age", max_checkpoint_age),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.ray = ray
        self.spec, self.max_pending, self.drift = spec, max_pending, drift
        self.worker_threads = worker_threads
        self.checkpoint_every = checkpoint_every
        self.max_checkpoint_age = max_checkpoint_age
        self.remote_worker = ray.remote(Worker)
        self.actors = [self._start() for _ in range(workers)]
        self.placement: dict[Hashable, int] = {}
        self.outbox: dict[Hashable, list[tuple[int, Tensor]]] = {}
        self.answered: dict[Hashable, int] = {}  # frames answered per camera
        self.checkpoints: dict[Hashable, tuple[int, dict]] = {}  # answered count, snapshot
        self.failovers = 0
        self.failover_refreshes = 0
        self.closed = False

    def _start(self):
        return self.remote_worker.remote(
            self.spec, self.max_pending, self.drift, self.worker_threads
        )

    def load(self) -> list[int]:
        """Cameras per worker."""
        counts = [0] * len(self.actors)
        for index in self.placement.values():
            counts[index] += 1
        return counts

    def add_camera(self, camera: Hashable) -> int:
        """Place a new camera on the least-loaded worker; returns the worker's index."""
        self._check_open()
        if camera in self.placement:
            raise ValueError(f"camera {camera!r} is already served")
        index = self._least_loaded()
        self.ray.get(self.actors[index].add.remote(camera))
        self.placement[camera] = index
        self.outbox[camera] = []
        self.answered[camera] = 0
        return index

    def remove_camera(self, camera: Hashable) -> None:
        self._check_camera(camera)
        index = self.placement.pop(camera)
        self.ray.get(self.actors[index].remove.remote(camera))
        for table in (self.outbox, self.answered, self.checkpoints):
            table.pop(camera, None)

    def submit(self, camera: Hashable, sequence: int, frame: Tensor) -> None:
        """Queue one frame of `camera` for the next `tick`."""
        self._check_camera(camera)
        self.outbox[camera].append((sequence, frame))

    def tick(self) -> list[FrameResult]:
        """Send every queued frame to its camera's worker and return the results, in order per
        camera. A worker that died has its cameras moved and their unanswered frames resent."""
        self._check_open()
        results: list[FrameResult] = []
        sending = {camera: frames for camera, frames in self.outbox.items() if frames}
        while sending:
            calls = {}
            for index, actor in enumerate(self.actors):
                batch = [
                    (camera, sequence, frame)
                    for camera, frames in sending.items()
                    if self.placement[camera] == index
                    for sequence, frame in frames
                ]
                if batch:
                    calls[index] = actor.run.remote(batch)
            retry = {}
            for index, call in calls.items():
                try:
                    answered = self.ray.get(call)
                except self.ray.exceptions.RayActorError:
                    moved = self._failover(index)
                    retry.update({camera: sending[camera] for camera in moved if camera in sending})
                    continue
                results += answered
                for result in answered:
                    self.answered[result.camera] += 1 + len(result.dropped)
            for camera in sending:
                if camera not in retry:
                    self.outbox[camera] = []
            sending = retry
        self._checkpoint(results)
        return results

    def _checkpoint(self, results: list[FrameResult]) -> None:
        """Snapshot, all at once, every camera answered `checkpoint_every` frames since its
        last checkpoint."""
        calls = {}
        for camera in dict.fromkeys(result.camera for result in results):
            last = self.checkpoints.get(camera, (0, None))[0]
            if self.answered[camera] - last >= self.checkpoint_every:
                actor = self.actors[self.placement[camera]]
                calls[camera] = actor.snapshot.remote(camera)
        for camera, snapshot in zip(calls, self.ray.get(list(calls.values())), strict=True):
            self.checkpoints[camera] = (self.answered[camera], snapshot)

    def _failover(self, dead: int) -> list[Hashable]:
        """Replace dead worker `dead` and put its cameras back from their checkpoints."""
        self.failovers += 1
        self.actors[dead] = self._start()
        moved = [camera for camera, index in self.placement.items() if index == dead]
        for camera in moved:
            answered, snapshot = self.checkpoints.get(camera, (0, None))
            if snapshot is not None and self.answered[camera] - answered > self.max_checkpoint_age:
                snapshot = None
            if snapshot is None and self.answered[camera] > 0:
                self.failover_refreshes += 1  # the camera's next step is dense
            index = self._least_loaded()
            self.ray.get(self.actors[index].add.remote(camera, snapshot))
            self.placement[camera] = index
        return moved

    def _least_loaded(self) -> int:
        counts = self.load()
        return min(range(len(counts)), key=lambda index: counts[index])

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this router has been shut down")

    def _check_camera(self, camera: Hashable) -> None:
        self._check_open()
        if camera not in self.placement:
            raise KeyError(f"unknown camera {camera!r}; add it first")

    def worker_process(self, index: int) -> int:
        """The process id of worker `index` (to watch it, or to stop it in a test)."""
        return self.ray.get(self.actors[index].process_id.remote())

    def shutdown(self) -> None:
        """Stop every worker; the router refuses further calls."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.closed = True
