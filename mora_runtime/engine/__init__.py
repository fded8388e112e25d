"""The continuous-batching decode engine: scheduling, sampling, KV cache, prefix cache."""
