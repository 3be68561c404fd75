"""Serving layer: SavedModel export for TF Serving, its gRPC client and the local dev server.

Submodules: `export` (write, check and publish a versioned SavedModel), `client` (score
images against TF Serving's gRPC API) and `devserver` (a loopback stand-in for TF Serving).
Nothing is imported here, so `import kiqa.serving.client` does not load the Keras exporter.
"""
