"""lightning_trust.privacy"""
