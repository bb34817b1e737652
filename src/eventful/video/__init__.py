"""Video input: registry clips, decoding with PyAV, and frame preprocessing."""
