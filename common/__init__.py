"""Small helpers several rooms need (the app, the sinks, the CoinGecko client), with no imports of
their own from the project: `coingecko/` may use them without building the Faust app."""
