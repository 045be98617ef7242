"""medmeta: cross-domain few-shot learning on MedMNIST.

Data flows one way: manifest -> store -> tasks -> episodes -> trainers -> results.
"""
__version__ = "0.1.0"
