"""The MCP server over the stored market data: tools (derived from the DSL records), live price
resources, on stdio (`faust -A app mcp`) and on the worker's web server at `/mcp`."""
