"""Throwaway real services and a local multi-process cluster, for tests, benchmarks and
for trying the scaled set-up on one machine (`pigeon cluster up`)."""
