"""The tests' fixtures live in the `testkit` package, which the benchmarks share."""

pytest_plugins = ["testkit.fixtures"]
