"""The REST API, its OpenAPI description and the harvests page (explorer/ holds its assets)."""
