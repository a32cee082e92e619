"""lightning_trust.report"""
