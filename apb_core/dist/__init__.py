"""Processes and process groups: the environment, the launcher, the one worker loop, fault injection."""
