"""Runtimes that drive methods: the in-process simulation engine (and later Flower)."""
