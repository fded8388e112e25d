"""Base models: LM and CLIP loading, quantised linears, decode attention, and preparing the
default models."""
