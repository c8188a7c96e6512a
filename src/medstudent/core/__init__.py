"""Torch-free inference core: the steps around the network, written once for every engine."""
