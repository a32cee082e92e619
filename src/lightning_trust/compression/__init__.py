"""lightning_trust.compression"""
