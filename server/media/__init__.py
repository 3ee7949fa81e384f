"""Media: uploaded and generated images, their storage and cleanup."""
