"""Bundled demo: chat logs written for the project (not LoCoMo), with generated images."""
