"""Test support that ships with meshmerge but is never imported by the node itself."""
