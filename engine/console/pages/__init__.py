"""The console's pages, one module per area; each handler names the API operations
it runs (engine.console.ops) and renders one template."""
