"""The gateway's external shapes (pydantic): what every route shares, then one module per API."""
