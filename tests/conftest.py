"""The tests' fixtures live in the `testkit` package, which the benchmarks share; how the suite
is spread over xdist processes is in `testkit.scheduling`."""

pytest_plugins = ["testkit.fixtures", "testkit.scheduling"]
