"""Serving cameras on a local Ray cluster the tests start and stop: order per camera, affinity,
failover continuity, back-pressure, bad input and clean shutdown."""

import pytest
import torch

import eventful
from eventful.serve.ray_serving import ModelSpec, Router
from eventful.synthetic import moving_squares
from tests.helpers import assert_equal_up_to_rounding

ray = pytest.importorskip("ray")

SPEC = ModelSpec("vit-s16", 64, eventful.TopFraction(0.3))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def frames(seed: int, steps: int = 10) -> torch.Tensor:
    return moving_squares(steps, size=64, batch=1, seed=seed)[:, 0]


def run_alone(model, video, snapshot=None) -> list[torch.Tensor]:
    stream = model.stream()
    if snapshot is not None:
        stream.load_state_dict(snapshot)
    return [stream(frame[None]) for frame in video]


def serve(router: Router, videos: dict, start: int, stop: int) -> dict:
    results = {camera: [] for camera in videos}
    for sequence in range(start, stop):
        for camera, video in videos.items():
            router.submit(camera, sequence, video[sequence])
        for result in router.tick():
            results[result.camera].append(result)
    return results


def test_cameras_stay_on_their_workers_and_get_their_results_in_order(cluster):
    router = Router(SPEC, workers=2, checkpoint_every=3)
    try:
        videos = {f"cam{i}": frames(i) for i in range(4)}
        placed = {camera: router.add_camera(camera) for camera in videos}
        assert sorted(placed.values()) == [0, 0, 1, 1]  # balanced by load
        results = serve(router, videos, 0, 6)
        assert router.placement == placed  # affinity
        model = SPEC.build()
        for camera, video in videos.items():
            assert [r.sequence for r in results[camera]] == list(range(6))
            want = run_alone(model, video[:6])
            for result, expected in zip(results[camera], want, strict=True):
                assert_equal_up_to_rounding(result.output, expected)
    finally:
        router.shutdown()


def test_after_a_worker_dies_its_cameras_continue_from_their_checkpoints(cluster):
    router = Router(SPEC, workers=2, checkpoint_every=2)
    try:
        videos = {f"cam{i}": frames(10 + i) for i in range(4)}
        for camera in videos:
            router.add_camera(camera)
        before = serve(router, videos, 0, 5)
        dead = router.placement["cam0"]
        victims = [camera for camera, index in router.placement.items() if index == dead]
        checkpoints = {camera: router.checkpoints[camera] for camera in victims}
        ray.kill(router.actors[dead])
        after = serve(router, videos, 5, 9)
        assert router.failovers == 1 and router.failover_refreshes == 0
        model = SPEC.build()
        for camera in videos:
            sequences = [r.sequence for r in before[camera] + after[camera]]
            assert sequences == list(range(9))  # none dropped, none answered twice
        for camera in victims:
            # a run restarted from the same checkpoint gives the same outputs
            _, snapshot = checkpoints[camera]
            want = run_alone(model, videos[camera][5:9], snapshot)
            for result, expected in zip(after[camera], want, strict=True):
                assert_equal_up_to_rounding(result.output, expected)
    finally:
        router.shutdown()


def test_a_camera_faster_than_its_worker_has_its_oldest_frames_dropped_and_reported(cluster):
    router = Router(SPEC, workers=1, max_pending=2)
    try:
        router.add_camera("fast")
        video = frames(3)
        for sequence in range(5):
            router.submit("fast", sequence, video[sequence])
        results = router.tick()
        assert [r.sequence for r in results] == [3, 4]
        assert results[0].dropped == [0, 1, 2]
    finally:
        router.shutdown()


def test_bad_input_and_shutdown(cluster):
    router = Router(SPEC, workers=1)
    router.add_camera("cam")
    with pytest.raises(KeyError, match="unknown camera 'nobody'"):
        router.submit("nobody", 0, frames(1)[0])
    with pytest.raises(ValueError, match="already served"):
        router.add_camera("cam")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        Router(SPEC, workers=0)
    router.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        router.submit("cam", 0, frames(1)[0])
