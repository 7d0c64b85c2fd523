"""Privacy tools: DP accounting (membership-inference attacks and memorization scores live here too)."""
