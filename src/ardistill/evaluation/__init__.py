"""Evaluation: Frechet statistics, IS, precision/recall, feature networks, ADM files, FLOPs and reports."""
