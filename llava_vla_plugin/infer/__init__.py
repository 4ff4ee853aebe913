"""One policy pipeline with two model backends, the servers and offline eval."""
