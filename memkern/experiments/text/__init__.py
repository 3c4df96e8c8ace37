"""Measures of what a language model memorized of the texts planted in its training windows:
greedy extraction, exposure, suffix accuracy (docs/text.md)."""
