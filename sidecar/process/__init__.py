"""The app's processes: start, follow, signal and stop them (wrapper and alongside modes), their tree, the
listening socket handed to them, notify sockets, the sidecar's own signal handling, the health probe.
"""
