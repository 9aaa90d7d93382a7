"""What `faust -A app up` runs beside the worker on a developer's machine: the embedded broker
and PostgreSQL (`embedded.py`) and the process supervisor with the offline CoinGecko (`up.py`).
Tests and benchmarks start the same stand-ins."""
