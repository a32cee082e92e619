"""lightning_trust.fairness"""
