"""The hot-restart demo and bench: one instance, hot restart (SIGUSR2) vs plain restart, under load."""
