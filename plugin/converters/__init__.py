"""Converters that bring non-Q/R sources (MOSAIQ, Pinnacle, MIM, RayStation) into an auxiliary PACS."""
