"""Segmentation: evaluates segment rules on every profile change and emits entries and exits."""
