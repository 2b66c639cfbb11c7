"""Fault tests: a package, so that its conftest does not clash with the others under --doctest-modules."""
