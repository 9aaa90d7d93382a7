"""CoinGecko API v3: an HTTP client, exact parsing into DSL records, and a local fake server."""
