"""Processes: rank discovery for every launcher, the process group, gradient buckets, liveness, node-local sharding, JIT build locks."""
