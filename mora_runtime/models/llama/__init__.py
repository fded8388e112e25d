"""A compact forward for Llama-family causal LMs (model.py), used by the engine where the
architecture is supported; every other causal LM keeps HF's forward."""
