"""Wardrobe Server: the aiohttp application and its infrastructure."""

__version__ = "0.1.0"
