"""The engine: gates, buffers, incremental attention, eventful blocks, policies, state, ops."""
