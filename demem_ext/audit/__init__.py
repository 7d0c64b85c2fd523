"""The membership-inference audit: LiRA, metric attacks, ROC metrics, memorization, shadow models, the report."""
