"""evomerge.fitness"""
