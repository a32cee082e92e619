"""lightning_trust.explain"""
