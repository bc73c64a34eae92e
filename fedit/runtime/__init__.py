"""Runtimes: how the round loop reaches its clients (in-process, or Flower in runtime/flower.py)."""
