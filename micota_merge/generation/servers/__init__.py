"""OpenAI-compatible servers: the client and `vllm serve` on loopback."""
