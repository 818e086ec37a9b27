"""diffusers-mmgibbs."""
