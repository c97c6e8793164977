"""consul-sidecar: take an instance out of Consul before its app stops, so rolling updates lose no request."""

__version__ = "0.1.0"
