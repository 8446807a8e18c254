"""Orthanc edge: the SDK adapter, the plugin's wiring, local store, configuration and launcher."""
