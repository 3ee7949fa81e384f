"""Media: uploaded and generated images, their storage and cleanup.
`Media` (facade.py) is the handlers' entry point; docs/storage.md tells the design."""
