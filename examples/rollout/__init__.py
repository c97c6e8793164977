"""Rolling-update experiments: processes, an open-loop load client and a timeline plot."""
