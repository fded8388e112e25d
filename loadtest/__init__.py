"""Load generator and reports for MoRA Serve (or any OpenAI-compatible server).

`python -m loadtest run | compare | observe`; see docs/operations.md.
"""
