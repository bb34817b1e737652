"""Serving many cameras: `camera_batch` batches the cameras of one worker (no Ray needed)."""
