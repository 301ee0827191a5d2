"""Measuring edits: image metrics, LPIPS, PIE-Bench, peak memory."""
