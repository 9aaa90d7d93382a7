"""What the tests and the benchmarks share: worker processes and their environment (`workers`),
fresh databases and exact row comparisons (`databases`), record factories (`records`), a poller
on the CoinGecko fake (`pollers`), hypothesis strategies (`strategies`) and the tests' fixtures
(`fixtures`, a pytest plugin)."""
