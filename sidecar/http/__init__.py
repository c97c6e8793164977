"""The sidecar's own HTTP endpoints: the bounded status server, /ready's verdict, /metrics."""
