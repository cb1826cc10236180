"""Offline checkpoints: the tiny random family, stand-ins, the micro world."""
