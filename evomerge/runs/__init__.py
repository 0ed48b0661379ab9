"""evomerge.runs"""
