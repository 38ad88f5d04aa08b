"""Examples of bringing your own network and data (docs/guides/your-own-model-and-data.md)."""
