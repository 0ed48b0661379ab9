"""evomerge.zoo"""
