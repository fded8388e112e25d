"""Expert-set files: the format, the store, base fingerprints, PEFT import, synthetic sets."""
