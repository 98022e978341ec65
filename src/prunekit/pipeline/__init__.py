"""Stages that read and write run directories, and recipes that chain them."""
