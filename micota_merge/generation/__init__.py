"""Answers from a model: generate's backends and the OpenAI-compatible servers."""
