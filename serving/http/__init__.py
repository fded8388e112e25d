"""The HTTP surface (FastAPI app, request and answer models, errors, OpenAPI); imports no Ray."""
