"""Support for tests and benchmarks: code that drives the production steps, never used by the workflow."""
