"""lightning_trust.federated"""
