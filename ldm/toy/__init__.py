"""Toy world with known ground truth: generator, attribute oracle and small extractor nets."""
