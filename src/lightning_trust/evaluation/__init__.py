"""lightning_trust.evaluation"""
