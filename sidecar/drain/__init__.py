"""The wait between the confirmed deregistration and the app's signal, and its evidence: the kernel's view of the
app's port (socket table, destroy events, namespace counters) and the DNS probe.
"""
